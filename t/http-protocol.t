use strict;
use warnings;
use Test::More;
use Digest::MD5 qw(md5_hex);
use FindBin;
use lib "$FindBin::Bin/lib";
use ForkServerTest::HTTP;

# HTTP/1.1 behaviour of a worker, against a real server on 127.0.0.1.
my $srv = start_server(
    app_file => "$FindBin::Bin/apps/http-test.psgi",
    workers => 2, max_body_size => 1_000_000, body_buffer_size => 1024,
    max_header_size => 4096,
);
ok $srv->wait_ready, 'all workers accepting';
my $port = $srv->port;

subtest 'keep-alive' => sub {
    my $s = connect_to($port);
    my $buf = '';
    my $r1 = request_on($s, \$buf, "GET /pid HTTP/1.1\r\nHost: x\r\n\r\n");
    my $r2 = request_on($s, \$buf, "GET /pid HTTP/1.1\r\nHost: x\r\n\r\n");
    is $r1->{status}, 200;
    is $r2->{body}, $r1->{body}, 'two HTTP/1.1 requests, one connection, one worker';
    ok !defined $r1->{headers}{connection}, 'no Connection: close';
    # pipelined: both requests in one write
    print $s "GET /pid HTTP/1.1\r\nHost: x\r\n\r\nGET /nope HTTP/1.1\r\nHost: x\r\n\r\n";
    is read_response($s, \$buf)->{status}, 200, 'pipelined 1';
    is read_response($s, \$buf)->{status}, 404, 'pipelined 2';
    my $r3 = request_on($s, \$buf, "GET /pid HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    is $r3->{headers}{connection}, 'close', 'Connection: close honoured';
    ok !defined read_response($s, \$buf, timeout => 5), 'server closed the connection';

    my $s10 = connect_to($port);
    $buf = '';
    my $a = request_on($s10, \$buf, "GET /pid HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    is $a->{headers}{connection}, 'keep-alive', 'HTTP/1.0 keep-alive on request';
    my $b = request_on($s10, \$buf, "GET /pid HTTP/1.0\r\n\r\n");
    is $b->{status}, 200;
    is $b->{headers}{connection}, 'close', 'HTTP/1.0 without keep-alive: close';
    ok !defined read_response($s10, \$buf, timeout => 5), 'closed after HTTP/1.0 request';
};

subtest 'chunked request body' => sub {
    my $body = join '', map { chr(65 + $_ % 26) x ($_ * 100) } 1 .. 20;  # spills past 1024 to a file
    my $chunked = '';
    my $rest = $body;
    while (length $rest) { my $c = substr($rest, 0, 777, ''); $chunked .= sprintf("%x;ext=1\r\n%s\r\n", length $c, $c) }
    $chunked .= "0\r\nX-Trailer: t\r\n\r\n";
    my $r = http_raw($port, "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n$chunked");
    is $r->{status}, 200;
    like $r->{body}, qr/len=${\ length $body} cl=${\ length $body} md5=${\ md5_hex($body)} file=1 buffered=1/, 'decoded, CONTENT_LENGTH set';
    my $small = http_raw($port, "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n");
    like $small->{body}, qr/len=5 cl=5 md5=${\ md5_hex('hello')} file=0 buffered=1 reread=hello/, 'small: in memory, seekable';
    is http_raw($port, "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n")->{status}, 400, 'bad chunk size: 400';
};

subtest 'chunked and streaming responses' => sub {
    my $r = http_raw($port, "GET /stream HTTP/1.1\r\nHost: x\r\n\r\n");
    is $r->{status}, 200;
    is $r->{headers}{'transfer-encoding'}, 'chunked';
    ok $r->{chunked}, 'body chunked';
    is $r->{body}, 'part1;part2;part3;', 'writer output';
    my $r10 = http_raw($port, "GET /stream HTTP/1.0\r\n\r\n");
    is $r10->{body}, 'part1;part2;part3;', 'HTTP/1.0: plain body until close';
    ok !$r10->{headers}{'transfer-encoding'}, 'no chunking for HTTP/1.0';
    my $d = http_raw($port, "GET /delayed HTTP/1.1\r\nHost: x\r\n\r\n");
    like $d->{body}, qr/^delayed \d+$/, 'delayed response';
};

subtest 'Expect: 100-continue' => sub {
    my $s = connect_to($port);
    my $buf = '';
    print $s "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n";
    my $cont = read_response($s, \$buf);
    is $cont->{status}, 100, '100 Continue before the body was sent';
    print $s "hello";
    my $r = read_response($s, \$buf);
    like $r->{body}, qr/len=5 .*md5=${\ md5_hex('hello')}/;
    is http_raw($port, "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: magic\r\n\r\nhello")->{status}, 417;
    my $big = http_raw($port, "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\nExpect: 100-continue\r\n\r\n");
    is $big->{status}, 413, 'too large: 413 instead of 100';
};

subtest 'informational' => sub {
    my $s = connect_to($port);
    my $buf = '';
    my $r = request_on($s, \$buf, "GET /info HTTP/1.1\r\nHost: x\r\n\r\n");
    is $r->{status}, 103;
    is $r->{headers}{link}, '</a.css>; rel=preload';
    is read_response($s, \$buf)->{body}, 'after hints';
};

subtest 'HEAD' => sub {
    my $s = connect_to($port);
    my $buf = '';
    my $r = request_on($s, \$buf, "HEAD /pid HTTP/1.1\r\nHost: x\r\n\r\n", head => 1);
    is $r->{status}, 200;
    ok $r->{headers}{'content-length'} > 0, 'Content-Length of the GET body';
    my $next = request_on($s, \$buf, "GET /pid HTTP/1.1\r\nHost: x\r\n\r\n");
    like $next->{body}, qr/^\d+$/, 'no body was sent: next response parses';
    is $buf, '', 'nothing left over';
    my $sh = request_on($s, \$buf, "HEAD /stream HTTP/1.1\r\nHost: x\r\n\r\n", head => 1);
    is $sh->{status}, 200, 'HEAD of a streaming response';
    is request_on($s, \$buf, "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")->{status}, 404, 'connection still in sync';
};

subtest 'large upload goes to a temp file' => sub {
    my $body = join '', map { sprintf "%08d", $_ } 1 .. 60_000;   # 480 kB
    my $r = http_raw($port, "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: " . length($body) . "\r\n\r\n$body");
    is $r->{status}, 200;
    like $r->{body}, qr/len=480000 cl=480000 md5=${\ md5_hex($body)} file=1 buffered=1 reread=0000000100/, 'whole body, real file, seekable';
    my $small = http_raw($port, "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc");
    like $small->{body}, qr/len=3 .* file=0/, 'small body in memory';
};

subtest 'errors: 400, 413, 431' => sub {
    is http_raw($port, "THIS IS NOT HTTP\r\n\r\n")->{status}, 400, 'garbage: 400';
    is http_raw($port, "GET / HTTP/1.1\r\n\r\n")->{status}, 400, 'HTTP/1.1 without Host: 400';
    is http_raw($port, "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")->{status}, 400, 'bad Content-Length: 400';
    is http_raw($port, "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")->{status}, 400, 'CL and TE: 400';
    is http_raw($port, "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000001\r\n\r\n")->{status}, 413, 'Content-Length past max_body_size: 413';
    my $chunk = 'x' x 100_000;
    my $chunks = join '', map { sprintf("%x\r\n%s\r\n", length $chunk, $chunk) } 1 .. 11;
    is http_raw($port, "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n$chunks" . "0\r\n\r\n")->{status}, 413, 'chunked past max_body_size: 413';
    is http_raw($port, "GET / HTTP/1.1\r\nHost: x\r\nX-Big: " . ('a' x 5000) . "\r\n\r\n")->{status}, 431, 'header past max_header_size: 431';
    is http_raw($port, "GET / HTTP/1.1\r\nHost: x\r\nX-Big: " . ('a' x 5000))->{status}, 431, 'incomplete oversized head: 431';
    is http_raw($port, "GET /pid HTTP/1.1\r\nHost: x\r\n\r\n")->{status}, 200, 'server fine afterwards';
};

subtest 'access log' => sub {
    http_raw($port, "GET /pid?x=1 HTTP/1.1\r\nHost: x\r\nUser-Agent: t/1.0 (x)\r\nReferer: http://r/\r\n\r\n");
    my $line;
    ok wait_for(sub { ($line) = grep { m{/pid\?x=1} } split /\n/, $srv->access_log }, 10, 'log line'), 'logged';
    like $line, qr{^testapp 127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] "GET /pid\?x=1 HTTP/1\.1" 200 \d+ "http://r/" "t/1\.0 \(x\)" \d+\.\d{6}$},
        'combined log format with name first and time taken last';

    # no Referer, no User-Agent: "-"; a client's quotes cannot forge a
    # field (the parser already refuses control bytes in a head)
    http_raw($port, "GET /pid?x=2 HTTP/1.1\r\nHost: x\r\n\r\n");
    http_raw($port, "GET /pid?x=3 HTTP/1.1\r\nHost: x\r\nUser-Agent: a\" 200 1 \"b\\\r\n\r\n");
    my ($two, $three);
    ok wait_for(sub { ($two) = grep { m{/pid\?x=2} } split /\n/, $srv->access_log;
                      ($three) = grep { m{/pid\?x=3} } split /\n/, $srv->access_log; $two && $three }, 10, 'log lines');
    like $two, qr{" 200 \d+ "-" "-" \d+\.\d{6}$}, 'absent fields are "-"';
    like $three, qr{" 200 \d+ "-" "a\\x22 200 1 \\x22b\\x5c" \d+\.\d{6}$}, 'quotes and backslashes escaped';

    # a refused request is logged too, with the peer and the time taken
    is http_raw($port, "GET /pid?x=4 HTTP/1.1\r\n\r\n")->{status}, 400, 'no Host: 400';
    my $four;
    ok wait_for(sub { ($four) = grep { m{/pid\?x=4} } split /\n/, $srv->access_log }, 10, 'log line of the 400');
    like $four, qr{^testapp 127\.0\.0\.1 - - \[[^\]]+\] "GET /pid\?x=4 HTTP/1\.1" 400 \d+ "-" "-" \d+\.\d{6}$}, 'refused request logged';
};

$srv->stop;
is $srv->wait_exit, 0, 'server exited 0 after SIGTERM';
unlike $srv->stderr, qr/uninitialized|at \S+ line \d+/, 'no warnings from the server' or diag $srv->stderr;
is_deeply [children_of($srv->pid)], [], 'no workers left';
done_testing;
