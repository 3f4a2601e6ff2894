use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use ForkServerTest::HTTP;

# Worker management in the master: Emperor pipe bytes sent, recycling,
# harakiri, respawn.
my $app = "$FindBin::Bin/apps/http-test.psgi";

sub get_pid {
    my ($port) = @_;
    my $r = http_raw($port, "GET /pid HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    return $r && $r->{status} == 200 ? $r->{body} : undef;
}

subtest 'pipe bytes 5, 17 and heartbeat 26' => sub {
    my $srv = start_server(app_file => $app, workers => 2, heartbeat => 0.2);
    ok $srv->wait_emperor_byte(5), 'byte 5 (accepting)';
    ok $srv->wait_emperor_byte(17), 'byte 17 (loyal)';
    my $b = $srv->emperor_bytes;
    ok index($b, chr 5) < index($b, chr 17), '5 before 17';
    ok $srv->wait_emperor_byte(26, 5, 3), 'three heartbeats (byte 26)';
    $b = $srv->emperor_bytes;
    is scalar(() = $b =~ /\x05/g), 1, 'byte 5 once';
    is scalar(() = $b =~ /\x11/g), 1, 'byte 17 once';
    is scalar(my @w = $srv->workers), 2, 'two workers';
    $srv->stop;
    is $srv->wait_exit, 0, 'exit 0';
};

subtest 'idle byte 22' => sub {
    my $srv = start_server(app_file => $app, workers => 1, idle => 0.5);
    ok $srv->wait_ready, 'ready';
    ok $srv->wait_emperor_byte(22, 10), 'byte 22 after idle time';
    my $b = $srv->emperor_bytes(0.3);
    is scalar(() = $b =~ /\x16/g), 1, 'sent once';
    $srv->stop;
};

subtest 'max_requests recycles a worker' => sub {
    my $srv = start_server(app_file => $app, workers => 1, max_requests => 3);
    ok $srv->wait_ready, 'ready';
    my @pids = map { get_pid($srv->port) } 1 .. 3;
    is scalar(grep { $_ eq $pids[0] } @pids), 3, 'same worker for 3 requests';
    my $next = get_pid($srv->port);
    ok $next && $next ne $pids[0], "new worker after 3 requests ($pids[0] -> $next)";
    # keep-alive connection: the 3rd request gets Connection: close
    my $s = connect_to($srv->port);
    my $buf = '';
    my @r = map { request_on($s, \$buf, "GET /pid HTTP/1.1\r\nHost: x\r\n\r\n") } 1 .. 2;
    ok !$r[0]{headers}{connection} && $r[1]{headers}{connection} eq 'close', 'last request of a worker closes the connection';
    $srv->stop;
    is $srv->wait_exit, 0, 'exit 0';
};

subtest 'psgix.harakiri.commit' => sub {
    my $srv = start_server(app_file => $app, workers => 1);
    ok $srv->wait_ready, 'ready';
    my $r = http_raw($srv->port, "GET /commit HTTP/1.1\r\nHost: x\r\n\r\n");
    my ($old) = $r->{body} =~ /(\d+)/;
    ok wait_for(sub { my $p = get_pid($srv->port); $p && $p ne $old }, 10, 'new worker'), 'worker replaced after commit';
    $srv->stop;
};

subtest 'harakiri kills a stuck worker and logs' => sub {
    my $srv = start_server(app_file => $app, workers => 1, harakiri => 1);
    ok $srv->wait_ready, 'ready';
    my $before = get_pid($srv->port);
    my $r = http_raw($srv->port, "GET /hang HTTP/1.1\r\nHost: x\r\n\r\n", timeout => 20);
    ok !defined $r, 'stuck request: connection closed without a response';
    like $srv->stderr, qr/testapp: harakiri: worker 1 \(pid $before\) stuck more than 1s in "GET \/hang HTTP\/1.1" from 127.0.0.1/, 'logged with the request';
    my $after;
    ok wait_for(sub { $after = get_pid($srv->port) }, 10), 'serving again';
    isnt $after, $before, 'by a new worker';
    $srv->stop;
    is $srv->wait_exit, 0, 'exit 0';
};

subtest 'harakiri by the master when the worker cannot act' => sub {
    my $srv = start_server(app_file => $app, workers => 1, harakiri => 1);
    ok $srv->wait_ready, 'ready';
    my $before = get_pid($srv->port);
    my $r = http_raw($srv->port, "GET /hang-hard HTTP/1.1\r\nHost: x\r\n\r\n", timeout => 20);
    ok !defined $r, 'stuck request: connection closed without a response';
    like $srv->stderr, qr/harakiri: worker 1 \(pid $before\) stuck more than 1s in "GET \/hang-hard HTTP\/1.1" from 127.0.0.1, killed by the master/, 'logged with the request';
    my $after;
    ok wait_for(sub { $after = get_pid($srv->port) }, 10), 'serving again';
    isnt $after, $before, 'by a new worker';
    $srv->stop;
    is $srv->wait_exit, 0, 'exit 0';
};

subtest 'a killed worker is respawned' => sub {
    my $srv = start_server(app_file => $app, workers => 2);
    ok $srv->wait_ready, 'ready';
    my @w = $srv->workers;
    is scalar @w, 2, 'two workers';
    kill 'KILL', $w[0];
    my @now;
    ok wait_for(sub { @now = $srv->workers; @now == 2 && !grep { $_ == $w[0] } @now }, 10), 'respawned';
    ok((grep { $_ == $w[1] } @now), 'the other worker untouched');
    ok wait_for(sub { get_pid($srv->port) }, 10), 'serving';
    like $srv->stderr, qr/worker 1 \(pid $w[0]\) died \(signal 9\)/, 'death logged';
    $srv->stop;
    is $srv->wait_exit, 0, 'exit 0';
    is_deeply [children_of($srv->pid)], [], 'no workers left';
};

done_testing;
