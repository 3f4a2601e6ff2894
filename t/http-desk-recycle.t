use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use ForkServerTest::HTTP;

# A worker that leaves (psgix.harakiri.commit, max-requests) is replaced at
# once, in the same place on the workers' desk, while it still serves its
# kept connections for stop_grace. Once it is gone, its replacement's kept
# connections still go to a free sibling while the replacement is in a
# long request: the worker that left did not take its successor off the
# desk.
my $srv = start_server(app_file => "$FindBin::Bin/apps/http-test.psgi", workers => 2, stop_grace => 2);
ok $srv->wait_ready, 'ready';
my $dir = $srv->dir;

# kept connections, by the pid of the worker that answered, until $want
# of them are $pid's
sub kept_on {
    my ($want, $pid_ok) = @_;
    my %by_pid;
    for (1 .. 40) {
        my ($who, $conn) = kept_connection($srv->port, timeout => 10) or next;
        push @{ $by_pid{$who} }, $conn;
        my ($pid) = grep { $pid_ok->($_) && @{ $by_pid{$_} } >= $want } keys %by_pid;
        return ($pid, @{ $by_pid{$pid} }) if $pid;
    }
    return;
}

my @before = $srv->workers;
my ($old, $commit, $other) = kept_on(2, sub { 1 });
ok $old, "two kept connections on worker $old";
my $r = request_on($commit->[0], $commit->[1], "GET /commit HTTP/1.1\r\nHost: x\r\n\r\n", timeout => 10);
is $r && $r->{body}, "bye $old", 'that worker leaves';
ok wait_for(sub { !kill 0, $old }, 15), '... and is gone once its kept connections went quiet';
close $_->[0] for $commit, $other;
my %before = map { $_ => 1 } @before;
my ($successor) = grep { !$before{$_} } $srv->workers;
ok $successor, "a successor ($successor)";

my ($new, $slow, $fast) = kept_on(2, sub { $_[0] == $successor });
ok $new, "two kept connections on its successor $new";
print { $slow->[0] } "GET /block?slow HTTP/1.1\r\nHost: x\r\n\r\n";
ok wait_for(sub { -e "$dir/slow.started" }, 20), 'the successor waits in a request';
$r = request_on($fast->[0], $fast->[1], "GET /pid HTTP/1.1\r\nHost: x\r\n\r\n", timeout => 10);
ok $r && $r->{status} == 200, 'a request on its other kept connection is answered';
ok $r && $r->{body} ne $new, '... by the free worker';
ok !-e "$dir/slow.go", '... while the first one still waits';

open my $go, '>', "$dir/slow.go" or die;
close $go;
$r = read_response($slow->[0], $slow->[1], timeout => 20);
like $r && $r->{body} // '', qr/^done slow $new$/, 'the long request is answered by its worker';
$srv->stop;
is $srv->wait_exit, 0, 'exit 0';
done_testing;
