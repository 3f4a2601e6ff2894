use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use Errno qw(EAGAIN EWOULDBLOCK);
use IO::Handle ();
use Time::HiRes ();
use ForkServerTest::HTTP;

# Attacks on the vassal's HTTP server (real server, raw
# sockets on 127.0.0.1), each a regression test now that it is fixed.
my $app = "$FindBin::Bin/apps/http-test.psgi";

sub vm_hwm_kb {
    my ($kb) = slurp("/proc/$_[0]/status") =~ /^VmHWM:\s+(\d+)/m;
    return $kb // 0;
}

subtest 'keep-alive connections beyond MAX_CONNS do not lock new clients out' => sub {
    # 512 cheap keep-alive connections (one request each, then silence) fill
    # the one worker's connection table (MAX_CONNS); it then stops watching the
    # listener until one of them times out (keepalive_timeout), so a new
    # client waits that long. 1,100 such connections, refreshed every 3 s,
    # kept a 2-worker vassal from answering anyone (measured: 5 of 5 probes
    # timed out after 30 s). An idle keep-alive connection must give way.
    my $srv = start_server(app_file => $app, workers => 1, keepalive_timeout => 60);
    ok $srv->wait_ready, 'ready';
    my @held;
    for my $i (1 .. 512) {
        my $s = connect_to($srv->port);
        my $buf = '';
        my $r = request_on($s, \$buf, "GET /pid HTTP/1.1\r\nHost: x\r\n\r\n", timeout => 20);
        last unless $r && $r->{status} == 200;
        push @held, $s;
    }
    is scalar(@held), 512, '512 keep-alive connections served';
    # a request under way (half a head) is never the one closed to make room
    my $busy = connect_to($srv->port);
    print $busy "GET /pid HTTP/1.1\r\nHost: x\r\n";
    $busy->flush;
    my $s = connect_to($srv->port);
    print $s "GET /pid HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    my $buf = '';
    # well within keepalive_timeout (60 s)
    my $r = read_response($s, \$buf, timeout => 8);
    is $r && $r->{status}, 200, 'a new client is answered while idle keep-alive connections fill the table';
    # the oldest idle connections made room: the first is closed (end of file)
    my $gone = '';
    is ForkServerTest::HTTP::_read_more($held[0], \$gone, 8), 0,
        'the oldest idle keep-alive connection was closed to make room (end of file)';
    print $busy "\r\n";
    $buf = '';
    my $rb = read_response($busy, \$buf, timeout => 20);
    is $rb && $rb->{status}, 200, 'the request under way was kept and served';
    close $busy;
    close $_ for @held, $s;
    is http_raw($srv->port, "GET /pid HTTP/1.1\r\nHost: x\r\n\r\n", timeout => 90)->{status}, 200,
        'served once the idle connections are gone';
    $srv->stop;
};

subtest 'a pipelining flood does not grow the worker without bound' => sub {
    # The worker reads 64 kB from a ready connection every round but serves
    # one request per round: a client that pipelines faster than that is
    # buffered whole (300 MB sent: the worker's RSS went from 11 MB to 316 MB).
    # socket_timeout 1: the client never reads its responses, so the worker
    # gives the connection up 1 s after its writes stall, which ends the flood
    my $srv = start_server(app_file => $app, workers => 1, socket_timeout => 1);
    ok $srv->wait_ready, 'ready';
    my ($worker) = $srv->workers;
    my $before = vm_hwm_kb($worker);
    my $s = connect_to($srv->port);
    $s->blocking(0);
    my $chunk = "GET /pid HTTP/1.1\r\nHost: x\r\n\r\n" x 2000;
    my $sent = 0;
    my $until = Time::HiRes::time() + 15;    # a bounded load loop: 64 MB or 15 s
    while ($sent < 64 << 20 && Time::HiRes::time() < $until) {
        my $n = syswrite($s, $chunk);
        if (defined $n) { $sent += $n; next }
        last unless $! == EAGAIN || $! == EWOULDBLOCK;
        my $win = '';
        vec($win, fileno $s, 1) = 1;
        select(undef, my $wout = $win, undef, 0.2);
    }
    my $grew = vm_hwm_kb($worker) - $before;
    diag sprintf 'sent %.1f MB of pipelined requests; the worker grew by %d kB', $sent / 2**20, $grew;
    cmp_ok $grew, '<', 16 * 1024, 'the worker holds a bounded amount of unread requests';
    close $s;
    is http_raw($srv->port, "GET /pid HTTP/1.1\r\nHost: x\r\n\r\n", timeout => 60)->{status}, 200, 'still serving';
    # a pipelined head cut after the first request: served, then the rest of
    # the second is read (the worker reads on while a head is incomplete)
    $s = connect_to($srv->port);
    print $s "GET /pid HTTP/1.1\r\nHost: x\r\n\r\nGET /pid HTT";
    $s->flush;
    my $buf = '';
    my $r = read_response($s, \$buf, timeout => 20);
    is $r && $r->{status}, 200, 'the first pipelined request';
    print $s "P/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    $r = read_response($s, \$buf, timeout => 20);
    is $r && $r->{status}, 200, 'the second, whose head came in two pieces';
    close $s;
    $srv->stop;
};

subtest 'socket_timeout bounds a stall inside the request body' => sub {
    # _fill() waits in select() for the whole body deadline, so a client
    # that sends one byte of its body and stops holds the worker for
    # body_timeout (60 s), not socket_timeout (4 s, the documented "longest
    # single stall of a body read"). Two such clients took a 2-worker
    # vassal down for 60 s (a probe waited 59.1 s).
    my $srv = start_server(app_file => $app, workers => 1, socket_timeout => 1, body_timeout => 60);
    ok $srv->wait_ready, 'ready';
    my $s = connect_to($srv->port);
    print $s "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\na";
    my $buf = '';
    # well within body_timeout (60 s)
    my $r = read_response($s, \$buf, timeout => 8);
    ok $r, 'the stalled body is given up well before body_timeout';
    is $r && $r->{status}, 408, '408 Request Timeout';
    close $s;
    # Expect: 100-continue, then silence: the same bound, the same answer
    $s = connect_to($srv->port);
    print $s "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n";
    $buf = '';
    $r = read_response($s, \$buf, timeout => 8);
    is $r && $r->{status}, 100, '100 Continue';
    $r = read_response($s, \$buf, timeout => 8);
    is $r && $r->{status}, 408, 'then 408 well before body_timeout when the body never comes';
    close $s;
    is http_raw($srv->port, "GET /pid HTTP/1.1\r\nHost: x\r\n\r\n", timeout => 90)->{status}, 200, 'still serving';
    $srv->stop;
};

subtest 'framing comes only from the real framing headers' => sub {
    my $srv = start_server(app_file => $app, workers => 1);
    ok $srv->wait_ready, 'ready';
    # Transfer_Encoding (underscore) becomes HTTP_TRANSFER_ENCODING like the
    # real header: a proxy that forwards it frames the request without a body
    # while we read a chunked one (a desync). nginx and Apache drop such
    # header names; refusing them is as good.
    my $r = http_raw($srv->port, "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer_Encoding: chunked\r\n"
                               . "Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n", timeout => 10);
    # We drop such fields (nginx's default), so the request has no body.
    ok $r && $r->{status} == 200 && $r->{body} =~ /\blen=0\b/,
        'Transfer_Encoding does not frame the body (got: ' . ($r ? "$r->{status} $r->{body}" : 'nothing') . ')';
    # nor does Content_Length, and an underscore twin does not join the real field
    $r = http_raw($srv->port, "POST /target HTTP/1.1\r\nHost: x\r\nX_A: evil\r\nX-A: good\r\n"
                            . "Content_Length: 3\r\nConnection: close\r\n\r\n");
    is $r && $r->{status}, 200, 'Content_Length does not frame a body either';
    like $r && $r->{body}, qr/\bHTTP_X_A=good\z/, 'X_A is dropped, X-A is kept';
    # RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty
    # framing: the connection closes after it, whatever Connection says.
    my $s = connect_to($srv->port);
    print $s "POST /echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    my $buf = '';
    $r = read_response($s, \$buf, timeout => 10);
    like $r && $r->{headers}{connection} // '', qr/close/i, 'HTTP/1.0 + Transfer-Encoding: Connection: close';
    close $s;
    $srv->stop;
};

subtest 'request targets and Host (RFC 9112 3.2)' => sub {
    my $srv = start_server(app_file => $app, workers => 1);
    ok $srv->wait_ready, 'ready';
    # absolute-form must be accepted and its authority used as the host;
    # today PATH_INFO is "http://a.example/pid" (not starting with "/", as
    # PSGI requires) and HTTP_HOST stays the Host header's
    my $r = http_raw($srv->port, "GET http://a.example/pid HTTP/1.1\r\nHost: b.example\r\nConnection: close\r\n\r\n");
    is $r && $r->{status}, 200, 'absolute-form: PATH_INFO is the path';
    $r = http_raw($srv->port, "GET http://a.example:8080/tar%67et?q=1 HTTP/1.1\r\nHost: b.example\r\nConnection: close\r\n\r\n");
    is $r && $r->{body}, 'HTTP_HOST=a.example:8080 REQUEST_URI=/tar%67et?q=1 PATH_INFO=/target QUERY_STRING=q=1 HTTP_X_A=',
        "absolute-form: the target's authority is the host, the rest is origin-form";
    $r = http_raw($srv->port, "GET http://a.example/pid HTTP/1.1\r\nConnection: close\r\n\r\n");
    is $r && $r->{status}, 400, 'absolute-form without Host in HTTP/1.1: 400 (Host is still required)';
    for my $target ('pid', '*', 'http://a@b/pid') {
        $r = http_raw($srv->port, "GET $target HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        is $r && $r->{status}, 400, "GET $target: 400";
    }
    $r = http_raw($srv->port, "OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    isnt $r && $r->{status}, 400, 'OPTIONS * is a valid target';
    for my $host ('a b', 'a@b', "a/b") {
        $r = http_raw($srv->port, "GET /pid HTTP/1.1\r\nHost: $host\r\nConnection: close\r\n\r\n");
        is $r && $r->{status}, 400, "Host: $host is refused";
    }
    # HTTP::Parser::XS stops at 128 header lines: a 2 kB head of 200 small
    # headers is well within buffer-size (8 kB) yet refused as malformed
    my $many = join '', map { "X-$_: a\r\n" } 1 .. 200;
    $r = http_raw($srv->port, "GET /pid HTTP/1.1\r\nHost: x\r\n${many}Connection: close\r\n\r\n");
    is $r && $r->{status}, 431, '200 header lines: 431 (too many fields), not 400 (malformed)';
    $r = http_raw($srv->port, "GET /pid HTTP/1.1\r\nHost: a.example:8080\r\nConnection: close\r\n\r\n");
    is $r && $r->{status}, 200, 'a valid Host with a port is served';
    $r = http_raw($srv->port, "GET /pid HTTP/1.1\r\nHost: [::1]:8080\r\nConnection: close\r\n\r\n");
    is $r && $r->{status}, 200, 'an IPv6 literal Host is served';
    $srv->stop;
};

done_testing;
