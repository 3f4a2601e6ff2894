use strict;
use warnings;
use Test::More;
use lib 't/lib';
use Cwd ();
use File::Temp qw(tempdir);
use IO::Socket::UNIX;
use POSIX ();
use Socket qw(AF_UNIX SOCK_STREAM PF_UNSPEC SOL_SOCKET SCM_RIGHTS SHUT_WR);
use Socket::MsgHdr ();
use Test::TCP qw(empty_port);
use Time::HiRes ();
use ForkServer::Protocol qw(encode_packet encode_array);
use ForkServerTest::Emperor qw(
    become_subreaper spawn_vassal adopt read_bytes read_reply http_get wait_for wait_gone fd_targets program
);

# Thousands of malformed adoption requests against a live base vassal: it
# must refuse each (closing every descriptor it was sent), keep no
# descriptor and no process, and still adopt a good request afterwards.
# FUZZ_SEED replays a run; FUZZ_COUNT and FUZZ_SECONDS bound it.
plan skip_all => 'Linux only (/proc, SCM_RIGHTS)' unless $^O eq 'linux';
become_subreaper();

my $seed    = $ENV{FUZZ_SEED}    // int(rand 2**31);
my $count   = $ENV{FUZZ_COUNT}   // 3000;
my $seconds = $ENV{FUZZ_SECONDS} // 20;
diag "FUZZ_SEED=$seed (set it to replay this run)";
srand $seed;

my $dir   = tempdir(CLEANUP => 1);
my $sock  = "$dir/fork.sock";
my $log   = "$dir/base.log";
my $hello = Cwd::abs_path('t/apps/hello.psgi');
sub log_text { open my $fh, '<', $log or return ''; local $/; <$fh> }

my $base = spawn_vassal(argv => ['--name', 'fuzzbase', '--early-psgi', $hello, '--fork-server', $sock,
    '--fork-server-timeout', 2, '--fork-server-spares', 0], stderr => $log);    # the fork path's descriptors and processes
is read_bytes($base->{pipe}, 1, 20), "\x01", 'base ready' or BAIL_OUT('base did not start: ' . log_text());
my $fds_before = fd_targets($base->{pid});

# --- generators: each returns (bytes, descriptor kinds)
sub rbytes { join '', map { chr int rand 256 } 1 .. $_[0] }
sub rword  { join '', map { ('a' .. 'z', '-', '=', '/', '.')[rand 30] } 1 .. 1 + int rand 12 }
sub rargv  { (program(), map { rand() < 0.5 ? '--' . rword() : rword() } 1 .. int rand 6) }
sub header { my ($mod1, $size, $mod2) = @_; pack 'C v C', $mod1, $size, $mod2 }
sub good_body { encode_array(rargv()) }

my @cases = (
    ['random bytes',          sub { (rbytes(1 + int rand 300), 'sock') }],
    ['random bytes, mod1 35', sub { ("\x23" . rbytes(int rand 300), 'sock') }],
    ['truncated header',      sub { (substr(encode_packet(35, 1, good_body()), 0, 1 + int rand 3), 'sock') }],
    ['wrong modifier1',       sub { my $m; do { $m = int rand 256 } while $m == 35; (encode_packet($m, 1, good_body()), 'sock') }],
    ['size past the end',     sub { my $b = good_body(); (header(35, length($b) + 1 + int rand 100, 1) . $b, 'sock') }],
    # in one write: garbage arriving after a whole request is no longer part of it
    ['trailing garbage',      sub { (encode_packet(35, 1, good_body()) . rbytes(1 + int rand 20), 'whole', 'sock') }],
    ['array item past end',   sub { my $b = good_body(); substr($b, 0, 2, pack 'v', length($b) + int rand 1000); (encode_packet(35, 1, $b), 'sock') }],
    # may be well-formed by chance ("\x01\x00A" is the argv ["A"]): then
    # it is a real adoption, of a vassal that fails on its argv and exits
    ['array of random bytes', sub { (encode_packet(35, 1, rbytes(int rand 200)), 'sock') }, 'may adopt'],
    ['no descriptor',         sub { (encode_packet(35, 1, good_body())) }],
    ['4 or more descriptors', sub { (encode_packet(35, 7, good_body()), ('sock') x (4 + int rand 5)) }],
    ['mask/descriptor mismatch', sub {
        my $mask = int rand 256;
        my $n = int rand 4;
        $n = ($n + 1) % 4 if $n == (grep { $mask & $_ } 1, 2, 4) && !($mask & ~7) && ($mask & 1);
        (encode_packet(35, $mask, good_body()), ('sock') x $n);
    }],
    ['a pipe for the Emperor pipe',   sub { (encode_packet(35, 1, good_body()), 'pipe') }],
    ['/dev/null for the config pipe', sub { (encode_packet(35, 3, good_body()), 'sock', 'null') }],
    ['a pipe for the on-demand socket', sub { (encode_packet(35, 5, good_body()), 'sock', 'pipe') }],
    ['argv not UTF-8',        sub { (encode_packet(35, 1, encode_array(program(), '--name', "\xff" . rbytes(int rand 5) . "\xfe")), 'sock') }],
    ['argv with NUL',         sub { (encode_packet(35, 1, encode_array(program(), "--na\0me", 'x')), 'sock') }],
    ['empty argv',            sub { (encode_packet(35, 1, ''), 'sock') }],
    ['too many argv items',   sub { (encode_packet(35, 1, encode_array(map { 'x' } 1 .. 257)), 'sock') }],
    ['argv item too long',    sub { (encode_packet(35, 1, encode_array(program(), 'x' x 4097)), 'sock') }],
    ['empty connection',      sub { ('') }],
);

# Sends one request: the bytes with the descriptors in one sendmsg (split
# in two writes at a random point, as a slow client might), then end of
# file. Returns the connection and our ends of what was sent.
sub send_case {
    my ($bytes, @kinds) = @_;
    my $whole = grep { $_ eq 'whole' } @kinds;
    @kinds = grep { $_ ne 'whole' } @kinds;
    my (@send, @ours);
    for my $kind (@kinds) {
        if ($kind eq 'sock') {
            socketpair(my $a, my $b, AF_UNIX, SOCK_STREAM, PF_UNSPEC) or die "socketpair: $!";
            push @ours, $a; push @send, $b;
        } elsif ($kind eq 'pipe') {
            pipe(my $r, my $w) or die "pipe: $!";
            push @ours, $r; push @send, $w;
        } else {
            open my $null, '+<', '/dev/null' or die "/dev/null: $!";
            push @send, $null;
        }
    }
    my $c = IO::Socket::UNIX->new(Peer => $sock, Type => SOCK_STREAM) or die "connect $sock: $!";
    local $SIG{PIPE} = 'IGNORE';    # the base may refuse before we finish writing
    if (length $bytes) {
        my $cut = !$whole && length($bytes) > 1 && rand() < 0.3 ? 1 + int rand(length($bytes) - 1) : length $bytes;
        my $msg = Socket::MsgHdr->new(buf => substr($bytes, 0, $cut));
        $msg->cmsghdr(SOL_SOCKET, SCM_RIGHTS, pack('i*', map { fileno $_ } @send)) if @send;
        Socket::MsgHdr::sendmsg($c, $msg);
        syswrite $c, substr($bytes, $cut) if $cut < length $bytes;
    }
    close $_ for @send;
    shutdown $c, SHUT_WR;
    return ($c, @ours);
}

my %seen;
my ($sent, $replied, $leaked, $wrongly) = (0, 0, 0, 0);
my @adopted;
my $deadline = Time::HiRes::time() + $seconds;
while ($sent < $count && Time::HiRes::time() < $deadline) {
    my ($name, $gen, $may_adopt) = @{ $cases[rand @cases] };
    my ($c, @ours) = send_case($gen->());
    $sent++;
    $seen{$name}++;
    my $reply = read_reply($c, 10);
    if (defined $reply) {
        # a random request that happened to be well-formed: a real adoption
        $replied++;
        $wrongly++ unless $may_adopt;
        my ($pid) = $reply =~ /pid..(\d+)/s;
        push @adopted, "$pid ($name)" if $pid;
    }
    # the base closed what it received: our ends see end of file
    for my $fh (@ours) { $leaked++ if read_bytes($fh, 1, 10) ne '' }
}
diag "$sent requests in " . scalar(keys %seen) . " kinds: " . join(', ', map { "$_ x$seen{$_}" } sort keys %seen);
cmp_ok $sent, '>=', 100, "$sent malformed requests sent";
is $wrongly, 0, 'no malformed request answered with a pid' or diag "adopted: @adopted";
ok wait_gone((split ' ', $_)[0], 15), "accidentally adopted $_ gone" for @adopted;
is $leaked, 0, 'every descriptor sent was closed by the base';
ok kill(0, $base->{pid}), 'the base is alive';

# The base closes a refused connection before it logs the refusal; an empty
# connection (a readiness probe's) is closed without a line.
my $refusals = sub { () = log_text() =~ /refused request/g };
my $expected = $sent - $replied - ($seen{'empty connection'} // 0);
ok wait_for(10, sub { $refusals->() >= $expected }), 'one refusal logged per request';
is $refusals->(), $expected, 'and none for an empty connection';
is_deeply fd_targets($base->{pid}), $fds_before, 'the base holds the same descriptors as before';

sub children_of {
    my ($ppid) = @_;
    opendir my $d, '/proc' or return;
    my @kids;
    for my $pid (grep { /^\d+$/ } readdir $d) {
        open my $fh, '<', "/proc/$pid/stat" or next;
        my ($parent) = (<$fh> // '') =~ /\)\s+\S+\s+(\d+)/;
        push @kids, $pid if ($parent // 0) == $ppid;
    }
    return @kids;
}
is_deeply [children_of($base->{pid})], [], 'the base has no child (no intermediate, no zombie)';
is_deeply [children_of($$)], [$base->{pid}], 'no process left besides the base';

my $port = empty_port();
my $v = adopt($sock, argv => ['--name', 'after', '--http-socket', "127.0.0.1:$port", '--env', 'APP_NAME=after']);
ok $v->{pid}, 'a good request still adopts';
is read_bytes($v->{pipe}, 3, 20), "\x01\x05\x11", 'the vassal starts';
like http_get($port, 10) // '', qr/APP_NAME=after/, 'and the vassal serves';
close $v->{pipe};
ok wait_gone($v->{pid}, 15), 'which stops on end of file';
close $base->{pipe};
ok wait_gone($base->{pid}, 15), 'base stops';
done_testing;
