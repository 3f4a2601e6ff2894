use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use Time::HiRes ();
use ForkServerTest::HTTP;

# Stopping and respawning workers.
my $app = "$FindBin::Bin/apps/http-test.psgi";

subtest 'a reload does not interrupt the app' => sub {
    my $srv = start_server(app_file => $app, workers => 1);
    ok $srv->wait_ready, 'ready';
    my $s = connect_to($srv->port);
    print $s "GET /sleep?s1 HTTP/1.1\r\nHost: x\r\n\r\n";
    ok wait_for(sub { -e $srv->dir . '/s1.started' }, 10), 'the app sleeps';
    $srv->send_emperor(1);
    my $buf = '';
    my $r = read_response($s, \$buf, timeout => 20);
    my ($slept) = ($r && $r->{body} // '') =~ /slept ([\d.]+)/;
    ok defined $slept && $slept >= 1.9, 'sleep 2 slept its 2 s (' . ($slept // 'no answer') . ')';
    is $r && $r->{headers}{connection}, 'close', 'and the connection closes after it';
    $srv->stop;
};

subtest 'a poisoned route never leaves the vassal without a worker' => sub {
    my $srv = start_server(app_file => $app, workers => 1, access_log => undef);
    ok $srv->wait_ready, 'ready';
    # each /die kills the worker that takes it; the slot must come back at
    # once (a crash-loop back-off used to grow to 5 s per death)
    my $rounds = 15;
    my $served = 0;
    my $start = Time::HiRes::time();
    for (1 .. $rounds) {
        http_raw($srv->port, "GET /die HTTP/1.1\r\nHost: x\r\n\r\n", timeout => 10);
        my $r = http_raw($srv->port, "GET /pid HTTP/1.1\r\nHost: x\r\n\r\n", timeout => 10);
        $served++ if $r && $r->{status} == 200;
        last if Time::HiRes::time() - $start > 25;    # a generous bound for 15 respawns
    }
    is $served, $rounds, "$rounds deaths, every following request answered within the bound";
    $srv->stop;
};

subtest 'a recycling worker is replaced at once, not when its idle connections go' => sub {
    # stop_grace 60: the recycling worker keeps its idle connection open
    # that long; a replacement must serve meanwhile
    my $srv = start_server(app_file => $app, workers => 1, max_requests => 2,
                           keepalive_timeout => 60, stop_grace => 60, access_log => undef);
    ok $srv->wait_ready, 'ready';
    my $idle = connect_to($srv->port);
    my $ibuf = '';
    my $first = request_on($idle, \$ibuf, "GET /pid HTTP/1.1\r\nHost: x\r\n\r\n");
    is $first->{status}, 200, 'request 1, connection kept';
    my $second = http_raw($srv->port, "GET /pid HTTP/1.1\r\nHost: x\r\n\r\n");
    is $second->{body}, $first->{body}, 'request 2: the same worker, now recycling';
    my $third = http_raw($srv->port, "GET /pid HTTP/1.1\r\nHost: x\r\n\r\n", timeout => 20);
    ok $third && $third->{status} == 200 && $third->{body} != $first->{body},
        'request 3 answered by the replacement';
    ok kill(0, $first->{body}), 'while the old worker still holds its idle connection';
    close $idle;
    $srv->stop;
};

done_testing;
