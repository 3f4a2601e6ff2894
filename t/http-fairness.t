use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use ForkServerTest::HTTP;

# A worker busy with a slow request does not keep the idle keep-alive
# connections it served before: a request sent on one of them (as nginx
# does with its kept upstream connections) is served by a free worker
# while the slow one still runs.
my $app = "$FindBin::Bin/apps/http-test.psgi";
sub slow_beside_kept {
    my $how = shift;
    my $srv = start_server(app_file => $app, workers => 2);
    ok $srv->wait_ready, "ready ($how)";
    my $dir = $srv->dir;

    # three kept connections on two workers: two of them were served by the
    # same worker, which (on a server where a worker owns its connections)
    # still holds both
    my (%by_pid, @conns);
    for (1 .. 3) {
        ok my ($pid, $conn) = kept_connection($srv->port), 'a kept connection';
        push @conns, $conn if $conn;
        push @{ $by_pid{$pid} }, $conn if $pid;
    }
    my ($pair) = grep { @$_ >= 2 } values %by_pid;
    my $slow = $pair->[0];
    my @others = grep { $_ != $slow } @conns;

    print { $slow->[0] } "GET /block?slow HTTP/1.1\r\nHost: x\r\n\r\n";
    ok wait_for(sub { -e "$dir/slow.started" }, 20), 'a worker is in the slow request';

    my $body = 'x' x 1000;
    my @fast_pids;
    for my $c (@others) {
        my $r = request_on($c->[0], $c->[1],
                           "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n$body", timeout => 20);
        ok $r && $r->{status} == 200, 'a POST on another kept connection is answered';
        like $r && $r->{body}, qr/^len=1000 /, '... with its whole body';
        $r = request_on($c->[0], $c->[1], "GET /pid HTTP/1.1\r\nHost: x\r\n\r\n", timeout => 20);
        ok $r && $r->{status} == 200, '... and the connection is still kept';
        push @fast_pids, $r && $r->{body};
    }
    ok !-e "$dir/slow.go", 'all of it while the slow request still runs';

    open my $go, '>', "$dir/slow.go" or die; close $go;
    my $r = read_response($slow->[0], $slow->[1], timeout => 20);
    my ($slow_pid) = ($r && $r->{body} // '') =~ /^done slow (\d+)$/;
    ok $slow_pid, 'the slow request is answered';
    ok !grep({ !$_ || $_ eq $slow_pid } @fast_pids), 'the others by the free worker';
    $r = request_on($slow->[0], $slow->[1], "GET /pid HTTP/1.1\r\nHost: x\r\n\r\n", timeout => 20);
    ok $r && $r->{status} == 200, 'the slow request\'s connection is kept too';
    is scalar(() = slurp($srv->{log}) =~ m{"POST /echo }g), 2, 'each POST reached the app once';

    $srv->stop;
    is $srv->wait_exit, 0, 'exit 0';
}

slow_beside_kept('the desk');
my ($srv, $dir, %by_pid, $pair, $go, $r);

# Two requests that arrive together on two kept connections of one worker
# (as nginx sends them on its kept upstream connections): the worker serves
# one, and the other is served by its idle sibling at once, not after the
# first (a long one here) is done.
$srv = start_server(app_file => $app, workers => 2);
ok $srv->wait_ready, 'ready again';
$dir = $srv->dir;
%by_pid = ();
for (1 .. 3) {
    ok my ($pid, $conn) = kept_connection($srv->port), 'a kept connection';
    push @{ $by_pid{$pid} }, $conn if $pid;
}
($pair) = grep { @$_ >= 2 } values %by_pid;
print { $pair->[0][0] } "GET /block?one HTTP/1.1\r\nHost: x\r\n\r\n";
print { $pair->[1][0] } "GET /block?two HTTP/1.1\r\nHost: x\r\n\r\n";
ok wait_for(sub { -e "$dir/one.started" && -e "$dir/two.started" }, 20),
    'both requests run at once, on the two workers';
open $go, '>', "$dir/$_.go" or die for qw(one two);
close $go;
my %served_by;
for my $c (@$pair[0, 1]) {
    my $r = read_response($c->[0], $c->[1], timeout => 20);
    ok $r && $r->{status} == 200, 'answered';
    my ($pid) = ($r && $r->{body} // '') =~ /^done \w+ (\d+)$/;
    $served_by{$pid // ''} = 1;
}
is scalar(grep { length } keys %served_by), 2, 'by two workers';
$srv->stop;
is $srv->wait_exit, 0, 'exit 0';
# A request that arrives on a kept connection of a worker while that worker
# starts a slow one, at a moment its sibling is busy too (under a steady
# load, nearly always): once the sibling is free it takes the connection
# and serves the request, without waiting for the slow one.
$srv = start_server(app_file => $app, workers => 2);
ok $srv->wait_ready, 'ready a third time';
$dir = $srv->dir;
my @kept;
for (1 .. 4) {
    my $s = connect_to($srv->port);
    my $buf = '';
    my $r = request_on($s, \$buf, "GET /pid HTTP/1.1\r\nHost: x\r\n\r\n");
    ok $r && $r->{status} == 200, 'a kept connection';
    push @kept, [$s, \$buf];
}
my ($z, $y, $s3, $x) = @kept;
# one worker busy: its idle connections go to the other one
print { $z->[0] } "GET /block?b HTTP/1.1\r\nHost: x\r\n\r\n";
ok wait_for(sub { -e "$dir/b.started" }, 20), 'one worker is busy';
my %free_pid;
for my $c ($y, $s3, $x) {
    my $r = request_on($c->[0], $c->[1], "GET /pid HTTP/1.1\r\nHost: x\r\n\r\n", timeout => 20);
    $free_pid{ $r && $r->{body} // '' } = 1;
}
is scalar(keys %free_pid), 1, 'the other connections are all the free worker\'s now';
my ($pid_a) = keys %free_pid;
# that one busy too; meanwhile a slow request and a fast one arrive on two
# of its connections, which it reads in one round once it is free
print { $y->[0] } "GET /block?a HTTP/1.1\r\nHost: x\r\n\r\n";
ok wait_for(sub { -e "$dir/a.started" }, 20), 'both workers are busy';
print { $s3->[0] } "GET /block?slow3 HTTP/1.1\r\nHost: x\r\n\r\n";
print { $x->[0] } "GET /pid HTTP/1.1\r\nHost: x\r\n\r\n";
open $go, '>', "$dir/a.go" or die; close $go;
ok wait_for(sub { -e "$dir/slow3.started" }, 20), 'the worker starts the slow request';
$r = read_response($y->[0], $y->[1], timeout => 20);
ok $r && $r->{status} == 200, 'its first request is answered';
open $go, '>', "$dir/b.go" or die; close $go;
$r = read_response($z->[0], $z->[1], timeout => 20);
ok $r && $r->{status} == 200, 'the sibling is free again';
$r = read_response($x->[0], $x->[1], timeout => 10);
ok $r && $r->{status} == 200, 'the fast request is answered';
$r = request_on($x->[0], $x->[1], "GET /pid HTTP/1.1\r\nHost: x\r\n\r\n", timeout => 10);
ok $r && $r->{status} == 200, 'so is the next one on its connection';
isnt $r && $r->{body}, $pid_a, '... by the free sibling';
ok !-e "$dir/slow3.go", 'while the slow request still runs';
open $go, '>', "$dir/slow3.go" or die; close $go;
$r = read_response($s3->[0], $s3->[1], timeout => 20);
like $r && $r->{body} // '', qr/^done slow3 $pid_a$/, 'the slow request is answered by its worker';
$srv->stop;
is $srv->wait_exit, 0, 'exit 0';

# Workers that are not dumpable (here root's, the test process made so; a
# vassal that dropped root is made dumpable again only where nothing
# privileged is left, docs/security.md) may not take each other's
# descriptors: they give their idle connections away at the start of a
# request instead, the earlier hand-over, which is not fair under load
# (a connection it just took stays with it), but loses and repeats nothing:
# every request on the kept connections is answered once, whole, whichever
# worker serves it, with the connections kept.
{
    my $prctl = ForkServer::Process::Syscalls::number('prctl') or die "no SYS_prctl\n";
    is syscall($prctl, 4, 0, 0, 0, 0), 0, 'this test process is not dumpable now';    # PR_SET_DUMPABLE
    $srv = start_server(app_file => $app, workers => 2);
    ok $srv->wait_ready, 'ready (not dumpable: the earlier hand-over)';
    $dir = $srv->dir;
    my @conns;
    for (1 .. 4) {
        my $s = connect_to($srv->port);
        my $buf = '';
        my $r = request_on($s, \$buf, "GET /pid HTTP/1.1\r\nHost: x\r\n\r\n");
        ok $r && $r->{status} == 200, 'a kept connection';
        push @conns, [$s, \$buf];
    }
    my ($slow, @others) = @conns;
    print { $slow->[0] } "GET /block?slow4 HTTP/1.1\r\nHost: x\r\n\r\n";
    ok wait_for(sub { -e "$dir/slow4.started" }, 20), 'a worker is in the slow request';
    my $body = 'x' x 1000;
    print { $_->[0] } "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n$body" for @others;
    open $go, '>', "$dir/slow4.go" or die; close $go;
    for my $c (@others) {
        my $r = read_response($c->[0], $c->[1], timeout => 20);
        like $r && $r->{body} // '', qr/^len=1000 /, 'a POST on a kept connection is answered whole';
        $r = request_on($c->[0], $c->[1], "GET /pid HTTP/1.1\r\nHost: x\r\n\r\n", timeout => 20);
        ok $r && $r->{status} == 200, '... and the connection is still kept';
    }
    $r = read_response($slow->[0], $slow->[1], timeout => 20);
    like $r && $r->{body} // '', qr/^done slow4 \d+$/, 'the slow request is answered';
    is scalar(() = slurp($srv->{log}) =~ m{"POST /echo }g), 3, 'each POST reached the app once';
    $srv->stop;
    is $srv->wait_exit, 0, 'exit 0';
}
done_testing;
