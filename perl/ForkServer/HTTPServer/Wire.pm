package ForkServer::HTTPServer::Wire;
use strict;
use warnings;

# What every room of the HTTP server shares on the wire: the clock, the
# phase deadline, whole writes and bounded reads, status lines and dates.

use Errno qw(EINTR EAGAIN);
use Exporter 'import';
use HTTP::Status ();
use POSIX ();
use Time::HiRes ();

our @EXPORT_OK = qw(now write_all fill status_line tick http_date log_date CRLF READ_CHUNK);

use constant {
    READ_CHUNK => 65536,
    CRLF       => "\015\012",
};

# Where the current phase's deadline ends (body read, response write); 0:
# no deadline. Set with `local` by the phase that owns it.
our $DEADLINE = 0;
# The longest single wait for the peer within that phase (socket_timeout):
# a deadline bounds a trickle, this bounds a stall. 0: none.
our $STALL = 0;
# Set by fill() when it gave up on time (a stall or the deadline), not on
# end of file or an error: the caller answers 408 rather than 400.
our $TIMED_OUT = 0;

my @MON = qw(Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec);
my @DAY = qw(Sun Mon Tue Wed Thu Fri Sat);

# Time::HiRes makes its CLOCK_* constants as plain subs on first call, not
# inlined: asked once here, the clock costs one call, not two (a request
# reads it five times or more).
use constant MONOTONIC => Time::HiRes::CLOCK_MONOTONIC();
sub now { Time::HiRes::clock_gettime(MONOTONIC) }

# Status lines are few; build each once.
my %STATUS_LINE;
sub status_line {
    my $s = shift;
    return $STATUS_LINE{$s} //= "HTTP/1.1 $s " . (HTTP::Status::status_message($s) // 'Unknown') . CRLF;
}

# Date: header and access-log time, recomputed once a second.
my ($clock_sec, $http_date, $log_date) = (-1);
sub tick {
    my $t = time;
    return if $t == $clock_sec;
    $clock_sec = $t;
    my @g = gmtime $t;
    $http_date = sprintf("%s, %02d %s %04d %02d:%02d:%02d GMT",
        $DAY[$g[6]], $g[3], $MON[$g[4]], $g[5] + 1900, $g[2], $g[1], $g[0]);
    my @l = localtime $t;
    my $off = POSIX::strftime('%z', @l);
    $log_date = sprintf("%02d/%s/%04d:%02d:%02d:%02d %s",
        $l[3], $MON[$l[4]], $l[5] + 1900, $l[2], $l[1], $l[0], $off);
}
sub http_date { tick(); return $http_date }
sub log_date  { tick(); return $log_date }

sub write_all {
    my ($conn, $data) = @_;
    my $len = length $data;
    my $off = 0;
    while ($off < $len) {
        my $n = syswrite($conn, $data, $len - $off, $off);
        if (!defined $n) {
            next if $! == EINTR;
            die "ForkServer::client-gone: write: " . ($! == EAGAIN ? 'stalled past socket_timeout' : $!) . "\n";
        }
        $off += $n;
        # Each write blocks at most socket_timeout (SO_SNDTIMEO); the whole
        # response is bounded by its own deadline.
        die "ForkServer::client-gone: write: response deadline passed\n"
            if $off < $len && $DEADLINE && now() > $DEADLINE;
    }
    return $len;
}

# Reads more bytes into $$bufref before $DEADLINE; returns the count; 0
# means EOF, a stall past $STALL (socket_timeout) or the deadline passed
# ($TIMED_OUT tells the last two from the first).
sub fill {
    my ($conn, $bufref, $want) = @_;
    $TIMED_OUT = 0;
    while (1) {
        if ($DEADLINE) {
            my $left = $DEADLINE - now();
            if ($left <= 0) { $TIMED_OUT = 1; return 0 }
            my $wait = $STALL && $STALL < $left ? $STALL : $left;
            my $rin = '';
            vec($rin, fileno $conn, 1) = 1;
            my $n = select(my $rout = $rin, undef, undef, $wait);
            if ($n < 0) { next if $! == EINTR; return 0 }
            if ($n == 0) { $TIMED_OUT = 1; return 0 }
        }
        my $n = sysread($conn, $$bufref, $want || READ_CHUNK, length $$bufref);
        return $n if defined $n;
        next if $! == EINTR;
        $TIMED_OUT = 1 if $! == EAGAIN;    # SO_RCVTIMEO: a stall
        return 0;    # ECONNRESET, ...
    }
}

1;

__END__

=head1 NAME

ForkServer::HTTPServer::Wire - clock, deadlines and whole reads and writes shared by the HTTP server's modules

=head1 FUNCTIONS

C<now()> (monotonic seconds); C<write_all($sock, $bytes)> (dies
C<ForkServer::client-gone: ...> when the client stalls past the socket
timeout or C<$DEADLINE> passes); C<fill($sock, \$buf, $want)> (appends; 0 at
end of file, stall or deadline); C<status_line($code)>; C<http_date()> and
C<log_date()> (recomputed once a second); C<CRLF>, C<READ_CHUNK>.
C<$ForkServer::HTTPServer::Wire::DEADLINE> is the current phase's deadline,
set with C<local>; C<$STALL> the longest single wait within it (also set with
C<local>); C<$TIMED_OUT> is true after a C<fill()> that gave up on time.

=cut
