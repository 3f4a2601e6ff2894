# Tells who answers and what that process was given: its vassal's %ENV,
# working directory, uid, and the session it belongs to.
use strict;
use warnings;
use Cwd ();
my $app = sub {
    my $name = $ENV{APP_NAME} // '-';
    my $cwd  = Cwd::getcwd() // '-';
    return [200, ['Content-Type' => 'text/plain'],
            ["name=$name cwd=$cwd uid=$< euid=$> pid=$$ ppid=" . getppid() . "\n"]];
};
$app;
