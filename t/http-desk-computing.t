use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use ForkServerTest::HTTP;

# A worker in a request that computes (it runs, it does not wait in the
# app) still lets a request waiting on another of its kept connections go
# to its free sibling: a worker that runs gives connections away when it
# had processor time of its own since the last look, not when the kernel
# merely did not run it.
my $srv = start_server(app_file => "$FindBin::Bin/apps/http-test.psgi", workers => 2);
ok $srv->wait_ready, 'ready';
my $dir = $srv->dir;

my %by_pid;
for (1 .. 3) {
    ok my ($pid, $conn) = kept_connection($srv->port), 'a kept connection';
    push @{ $by_pid{$pid} }, $conn if $pid;
}
my ($busy_pid) = grep { @{ $by_pid{$_} } >= 2 } keys %by_pid;
my ($spinning, $waiting) = @{ $by_pid{$busy_pid} };

print { $spinning->[0] } "GET /spin?spin HTTP/1.1\r\nHost: x\r\n\r\n";
ok wait_for(sub { -e "$dir/spin.started" }, 20), 'a worker computes';
my $r = request_on($waiting->[0], $waiting->[1], "GET /pid HTTP/1.1\r\nHost: x\r\n\r\n", timeout => 20);
ok $r && $r->{status} == 200, 'a request on its other kept connection is answered';
isnt $r && $r->{body}, $busy_pid, '... by the free worker';
ok !-e "$dir/spin.go", '... while the first one still computes';

open my $go, '>', "$dir/spin.go" or die;
close $go;
$r = read_response($spinning->[0], $spinning->[1], timeout => 20);
like $r && $r->{body} // '', qr/^done spin $busy_pid$/, 'the computing request is answered by its worker';
$srv->stop;
is $srv->wait_exit, 0, 'exit 0';
done_testing;
