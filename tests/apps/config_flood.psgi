# A hostile tenant's app: while it loads (in the vassal's master, which
# holds the Emperor pipe) it leaves a helper behind that asks for the
# config again (uWSGI's byte 2), 80,000 times, and never reads the answers.
use strict;
use warnings;
use POSIX ();

my $fd = $ENV{UWSGI_EMPEROR_FD};
my $pid = fork // die "fork: $!\n";
if (!$pid) {
    $0 = 'config flood helper';
    for (1 .. 20) {
        my $left = 4096;
        while ($left > 0) {
            my $w = POSIX::write($fd, "\x02" x $left, $left);
            POSIX::_exit(0) unless defined $w;
            $left -= $w;
        }
    }
    POSIX::_exit(0);
}
sub { [200, ['Content-Type' => 'text/plain'], ["name=flood\n"]] };
