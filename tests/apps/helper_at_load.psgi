# An app that starts a helper while it loads (a metrics pusher, a cache
# refresher): the helper lives as long as the vassal and holds whatever
# the loading process held then.
use strict;
use warnings;
use POSIX ();

my $pid = fork // die "fork: $!\n";
if (!$pid) {
    $0 = "helper started at load of $ENV{APP_NAME}";
    sleep 1 while getppid() > 1;
    POSIX::_exit(0);
}
sub { [200, ['Content-Type' => 'text/plain'], ["name=$ENV{APP_NAME}\n"]] };
