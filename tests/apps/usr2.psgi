# An app with a signal handler of its own (log rotation, say): every process
# forked from the base inherits it, a spare and its waiting worker too.
use strict;
use warnings;
$SIG{USR2} = sub { print STDERR "caught USR2 in $$\n" };
sub { [200, ['Content-Type' => 'text/plain'],
       ["name=" . ($ENV{APP_NAME} // '-') . " pid=$$ ppid=" . getppid() . "\n"]] };
