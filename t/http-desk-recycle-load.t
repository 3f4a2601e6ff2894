use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use POSIX ();
use Time::HiRes ();
use ForkServerTest::HTTP;
use ForkServerTest::Pipelining;

# Workers recycled by max-requests while clients keep many connections
# alive and pipeline on them, some requests slow: every request is
# answered, in order, on its own connection (a response may close the
# connection: what the client pipelined after it is sent again). Bounded:
# 6 clients of 6 connections each, for 5 seconds.
my $app = sub {
    my $env = shift;
    my ($id, $ms) = ($env->{QUERY_STRING} // '') =~ /^id=([\w-]+)(?:&ms=(\d+))?$/;
    Time::HiRes::sleep($ms / 1000) if $ms;
    return [200, ['Content-Type' => 'text/plain'], ["id=$id"]];
};
my $srv = start_server(app => $app, workers => 4, max_requests => 15);
ok $srv->wait_ready, 'ready';

my ($answered, @bad) = pipelining_load(
    port => $srv->port, clients => 6, conns => 6, seconds => 5,
    batch => sub {
        my ($client, $seq) = @_;
        my @ids = map { "$client-" . ++$$seq } 1 .. 1 + int rand 3;
        return (join('', map { "GET /?id=$_" . (rand() < 0.1 ? '&ms=30' : '') . " HTTP/1.1\r\nHost: x\r\n\r\n" } @ids),
                [map { [$_, "id=$_"] } @ids]);
    });
cmp_ok $answered, '>', 100, "requests answered ($answered)";
is scalar(@bad), 0, 'none lost or answered with another\'s response'
    or diag join "\n", @bad[0 .. ($#bad < 9 ? $#bad : 9)];
$srv->stop;
is $srv->wait_exit, 0, 'exit 0';
done_testing;
