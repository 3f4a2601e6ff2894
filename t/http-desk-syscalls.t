use strict;
use warnings;
use feature 'state';
use Test::More;
use FindBin;
use File::Temp ();
use POSIX ();
use lib "$FindBin::Bin/lib";
use ForkServerTest::HTTP;

# What the workers' desk costs a request of a worker that holds several
# kept connections: its stores to the shared memory, and no system call
# of its own. A lock let go and taken again at every request (two fcntl
# calls) was a fifth of hello world's time; the timer that wakes a sleeping
# sibling is armed only while a sibling sleeps, so with the sibling in a
# request of its own not even that. Counted by strace on the worker.

my ($strace) = grep { -x } map { "$_/strace" } qw(/usr/bin /bin);
plan skip_all => 'no strace' unless $strace;

my $srv = start_server(app_file => "$FindBin::Bin/apps/http-test.psgi", workers => 2);
ok $srv->wait_ready, 'ready';
my $dir = $srv->dir;

# kept connections until one worker holds two of them and the other one
# (whichever accepts a new connection is a race)
my %by_pid;
for (1 .. 40) {
    my ($pid, $conn) = kept_connection($srv->port) or die "no answer on a new connection\n";
    push @{ $by_pid{$pid} }, $conn;
    last if keys %by_pid == 2 && grep { @$_ >= 2 } values %by_pid;
}
my ($worker) = grep { @{ $by_pid{$_} } >= 2 } keys %by_pid;
my ($sibling) = grep { $_ ne ($worker // '') } keys %by_pid;
ok $worker && $sibling, 'one worker holds two kept connections, its sibling one at least'
    or die "the workers did not share the connections\n";
my $conn = $by_pid{$worker}[0];

# The system calls $pid makes while $n requests are served on $conn, by name.
sub counted {
    my ($pid, $n) = @_;
    state $runs = 0;
    my $out = "$dir/strace." . ++$runs;    # its own: strace says when it is attached there
    my $tracer = fork // die "fork: $!";
    if (!$tracer) {
        open STDERR, '>', "$out.err" or POSIX::_exit(1);
        exec($strace, '-c', '-o', $out, '-p', $pid) or POSIX::_exit(1);
    }
    ok wait_for(sub { slurp("$out.err") =~ /attached/ }, 20), 'strace is attached to the worker';
    my $served_here = 0;
    for (1 .. $n) {
        my $r = request_on($conn->[0], $conn->[1], "GET /pid HTTP/1.1\r\nHost: x\r\n\r\n", timeout => 20);
        $served_here++ if $r && $r->{status} == 200 && $r->{body} eq $pid;
    }
    is $served_here, $n, "$n requests served by the worker on its kept connection";
    kill 'INT', $tracer;
    waitpid $tracer, 0;
    my %calls;
    for (split /\n/, slurp($out)) {
        # % time, seconds, usecs/call, calls, [errors,] syscall
        $calls{$2} = $1 if /^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$/;
    }
    ok $calls{write} && $calls{write} >= $n, '(strace counted its writes)' or diag slurp($out);
    return \%calls;
}

# The sibling asleep in its loop. It looks at a request that runs longer
# than 1 ms (under strace, on a busy machine, many may: 22 of 100 were seen
# at a load of 20), and the worker then waits for its lock: some, not two a
# request (200) as before.
my $calls = counted($worker, 100);
cmp_ok $calls->{fcntl} // 0, '<', 60, 'no lock taken or let go at each request, the sibling asleep';

# the sibling in a request of its own (it holds one connection: nothing to
# take), so it looks at nothing, and sleeps not
my $held = $by_pid{$sibling}[0];
print { $held->[0] } "GET /block?held HTTP/1.1\r\nHost: x\r\n\r\n";
ok wait_for(sub { -e "$dir/held.started" }, 20), 'the sibling is in a request';
$calls = counted($worker, 100);
is $calls->{fcntl} // 0, 0, 'no lock taken or let go, the sibling busy';
is $calls->{timerfd_settime} // 0, 0, 'and no timer armed: no sibling sleeps';
open my $go, '>', "$dir/held.go" or die;
close $go;
my $r = read_response($held->[0], $held->[1], timeout => 20);
like $r && $r->{body} // '', qr/^done held $sibling$/, 'the sibling\'s request is answered';

$srv->stop;
is $srv->wait_exit, 0, 'exit 0';
done_testing;
