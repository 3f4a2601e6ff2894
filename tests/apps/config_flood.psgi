# A hostile tenant's app: while it loads (in the vassal's master, which
# holds the Emperor pipe) it leaves a helper behind that writes one byte of
# the vassal's protocol (FLOOD_BYTE, by default 2: the config again) 80,000
# times, and never reads the answers.
use strict;
use warnings;
use POSIX ();

my $fd = $ENV{UWSGI_EMPEROR_FD};
my $byte = chr($ENV{FLOOD_BYTE} // 2);
my $pid = fork // die "fork: $!\n";
if (!$pid) {
    $0 = 'config flood helper';
    for (1 .. 20) {
        my $left = 4096;
        while ($left > 0) {
            my $w = POSIX::write($fd, $byte x $left, $left);
            POSIX::_exit(0) unless defined $w;
            $left -= $w;
        }
    }
    POSIX::_exit(0);
}
sub { [200, ['Content-Type' => 'text/plain'], ["name=flood\n"]] };
