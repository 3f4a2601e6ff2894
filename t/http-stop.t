use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use Time::HiRes ();
use ForkServerTest::HTTP;

# Issue 9, Perl side: stopping and respawning workers.
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

done_testing;
