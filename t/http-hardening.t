use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use IO::Socket::INET ();
use Socket qw(SOL_SOCKET SO_LINGER);
use Time::HiRes ();
use ForkServerTest::HTTP;

# Each subtest is one defect, against a real server on 127.0.0.1.
my $app = "$FindBin::Bin/apps/http-test.psgi";

sub vm_hwm_kb {
    my $pid = shift;
    my ($kb) = slurp("/proc/$pid/status") =~ /^VmHWM:\s+(\d+)/m;
    return $kb;
}

# The client's own pace (the scenario a test plays), not synchronisation.
sub pause { select(undef, undef, undef, $_[0]) }

subtest 'harakiri: a failed response write disarms it' => sub {
    # 4 s, not less: a loaded machine (the suites run side by side) can hold
    # a 50 MB response's first write back for more than a second or two; the
    # body's stall below (5.6 s) must stay within socket-timeout
    my $srv = start_server(app_file => $app, workers => 1, harakiri => 4, socket_timeout => 10);
    ok $srv->wait_ready, 'ready';
    my $t0 = Time::HiRes::time();
    my $big = connect_to($srv->port);
    print $big "GET /big?50000000 HTTP/1.1\r\nHost: x\r\n\r\n";
    my $got = '';
    ok wait_for(sub { sysread($big, $got, 65536, length $got); length $got > 0 }, 20), 'the big response started';
    # reset, not a clean close: the worker's next write fails
    setsockopt($big, SOL_SOCKET, SO_LINGER, pack('ii', 1, 0));
    close $big;
    # a request whose body arrives after the first request's harakiri
    # deadline (and the master's one-second margin) would have passed
    my $s = connect_to($srv->port);
    print $s "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n";
    pause(0.05) while Time::HiRes::time() < $t0 + 5.6;
    print $s "hello";
    my $buf = '';
    my $r = read_response($s, \$buf, timeout => 20);
    is $r && $r->{status}, 200, 'the next request is answered';
    unlike $srv->stderr, qr/harakiri/, 'nobody blamed';
    $srv->stop;
};

subtest 'chunked uploads: bounded memory, absurd sizes refused' => sub {
    my $srv = start_server(app_file => $app, workers => 1, max_body_size => 0);
    ok $srv->wait_ready, 'ready';
    for my $size ('ffffffffffffffffff', '1000000000000') {
        my $r = http_raw($srv->port, "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n$size\r\nabc", timeout => 10);
        is $r && $r->{status}, 413, "chunk size $size: 413 at once";
    }
    my ($worker) = $srv->workers;
    my $before = vm_hwm_kb($worker);
    my $s = connect_to($srv->port);
    print $s "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n7fffffff\r\n";
    my $mb = 'y' x (1 << 20);
    print $s $mb for 1 .. 64;
    # the worker has taken all 64 MB once nothing is queued towards it
    ok wait_for(sub {
        my $q = `ss -tnH state established '( sport = :${\ $srv->port} )' 2>/dev/null`;
        !grep { (split ' ')[0] > 0 } split /\n/, $q;
    }, 30, 'the worker read the data'), 'data read';
    my $grew = vm_hwm_kb($worker) - $before;
    cmp_ok $grew, '<', 16 * 1024, "64 MB into one chunk grew the worker by ${grew} kB";
    close $s;
    is http_raw($srv->port, "GET /pid HTTP/1.1\r\nHost: x\r\n\r\n")->{status}, 200, 'still serving';
    $srv->stop;
};

subtest 'strict heads' => sub {
    my $srv = start_server(app_file => $app, workers => 1);
    ok $srv->wait_ready, 'ready';
    my %cases = (
        "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\nContent-Length: 3\r\n\r\nabc" => 400,
        "GET /pid HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n" => 400,
        "GET /pid HTTP/1.1\r\nHost: a\r\nX-Folded: a\r\n b\r\n\r\n" => 400,
        "GET /pid HTTP/2.0\r\nHost: a\r\n\r\n" => 505,
        "GET /pid HTTP/3.1\r\nHost: a\r\n\r\n" => 505,
        "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n" => 413,
        "G(T /pid HTTP/1.1\r\nHost: a\r\n\r\n" => 400,
        "GET /pid HTTP/1.1\r\nHost: a\r\n\r\n" => 200,
    );
    for my $raw (sort keys %cases) {
        my $r = http_raw($srv->port, $raw, timeout => 10);
        (my $show = substr($raw, 0, 60)) =~ s/\r\n/|/g;
        is $r && $r->{status}, $cases{$raw}, $show;
    }
    $srv->stop;
};

subtest 'slow clients' => sub {
    my $srv = start_server(app_file => $app, workers => 2, header_timeout => 3,
                           response_timeout => 3, socket_timeout => 1);
    ok $srv->wait_ready, 'ready';
    my $port = $srv->port;

    # a head trickled byte by byte is cut at its whole deadline
    my $drip = connect_to($port);
    my $head = "GET /pid HTTP/1.1\r\nHost: x\r\n" . ("X-Pad: " . ('p' x 20) . "\r\n") x 10 . "\r\n";
    my ($sent, $closed) = (0, 0);
    my $until = Time::HiRes::time() + 30;
    while ($sent < length $head && Time::HiRes::time() < $until) {
        last unless defined syswrite($drip, substr($head, $sent++, 1));
        my $rin = '';
        vec($rin, fileno $drip, 1) = 1;
        if (select(my $rout = $rin, undef, undef, 0.1) > 0) { $closed = 1; last }
    }
    ok $closed, "a trickled head is cut before it is complete ($sent of " . length($head) . ' bytes)';
    close $drip;

    # 100 slowloris connections: a normal client is still served
    my @loris = map { my $l = connect_to($port); print $l "GET /pid HTTP/1.1\r\n"; $l } 1 .. 100;
    my $served = 0;
    for my $i (1 .. 20) {
        syswrite($_, "X") for @loris;     # one more byte each, now and then
        my $r = http_raw($port, "GET /pid HTTP/1.1\r\nHost: x\r\n\r\n", timeout => 10);
        $served++ if $r && $r->{status} == 200;
    }
    is $served, 20, 'every request of a normal client answered beside 100 slowloris connections';
    close $_ for @loris;

    # a client that does not read its 50 MB response frees the worker at
    # the response deadline, and the worker takes the next client
    my $srv1 = start_server(app_file => $app, workers => 1, response_timeout => 2, socket_timeout => 1);
    ok $srv1->wait_ready, 'ready (1 worker)';
    my $lazy = connect_to($srv1->port);
    print $lazy "GET /big?50000000 HTTP/1.1\r\nHost: x\r\n\r\n";
    my $r = http_raw($srv1->port, "GET /pid HTTP/1.1\r\nHost: x\r\n\r\n", timeout => 20);
    is $r && $r->{status}, 200, 'the next client is served while the first one does not read';
    close $lazy;
    $srv->stop;
    $srv1->stop;
};

subtest 'keep-alive does not pin a worker' => sub {
    my $srv = start_server(app_file => $app, workers => 1, keepalive_timeout => 60);
    ok $srv->wait_ready, 'ready';
    my $a = connect_to($srv->port);
    my $abuf = '';
    is request_on($a, \$abuf, "GET /pid HTTP/1.1\r\nHost: x\r\n\r\n")->{status}, 200, 'A served, kept alive';
    my $r = http_raw($srv->port, "GET /pid HTTP/1.1\r\nHost: x\r\n\r\n", timeout => 15);
    is $r && $r->{status}, 200, 'B served while A idles on the only worker';
    is request_on($a, \$abuf, "GET /pid HTTP/1.1\r\nHost: x\r\n\r\n")->{status}, 200, 'A again';
    # 16 keep-alive connections on one worker, round robin: all served
    my @c = map { connect_to($srv->port) } 1 .. 16;
    my %bufs;
    my $ok = 0;
    for my $round (1 .. 3) {
        for my $i (0 .. $#c) {
            my $res = request_on($c[$i], \($bufs{$i} //= ''), "GET /pid HTTP/1.1\r\nHost: x\r\n\r\n", timeout => 15);
            $ok++ if $res && $res->{status} == 200;
        }
    }
    is $ok, 48, '16 keep-alive connections, 3 rounds, every request answered';
    $srv->stop;
};

subtest 'reload keeps keep-alive requests' => sub {
    my $srv = start_server(app_file => $app, workers => 2, access_log => undef);
    ok $srv->wait_ready, 'ready';
    pipe(my $ctl_r, my $ctl_w) or die;
    pipe(my $res_r, my $res_w) or die;
    my $client = fork // die;
    if ($client == 0) {
        close $ctl_w; close $res_r;
        my ($ok, $lost, $conns) = (0, 0, 0);
        my ($s, $buf);
        while (1) {
            my $rin = '';
            vec($rin, fileno $ctl_r, 1) = 1;
            last if select(my $rout = $rin, undef, undef, 0) > 0;
            unless ($s) { $s = connect_to($srv->port); $buf = ''; $conns++ }
            my $r = eval { request_on($s, \$buf, "GET /pid HTTP/1.1\r\nHost: x\r\n\r\n", timeout => 20) };
            if ($r && $r->{status} == 200) {
                $ok++;
                if (($r->{headers}{connection} // '') eq 'close') { close $s; undef $s }
            } else { $lost++; close $s; undef $s }
        }
        syswrite $res_w, "$ok $lost $conns\n";
        POSIX::_exit(0);
    }
    close $ctl_r; close $res_w;
    for my $round (1 .. 5) {
        my %before = map { $_ => 1 } $srv->workers;
        $srv->send_emperor(1);
        wait_for(sub { my @n = $srv->workers; @n == 2 && !grep { $before{$_} } @n }, 20, "reload $round");
    }
    close $ctl_w;
    my ($ok, $lost, $conns) = split ' ', (<$res_r> // '');
    waitpid $client, 0;
    cmp_ok $ok, '>', 0, "requests served ($ok on $conns connections)";
    is $lost, 0, 'no request on a kept-alive connection lost during 5 reloads';
    $srv->stop;
};

subtest 'psgix.cleanup' => sub {
    my $srv = start_server(app_file => $app, workers => 1);
    ok $srv->wait_ready, 'ready';
    my $r = http_raw($srv->port, "GET /cleanup?c1 HTTP/1.1\r\nHost: x\r\n\r\n");
    is $r->{body}, 'cleanup=1', 'psgix.cleanup is true';
    ok wait_for(sub { -e $srv->dir . '/c1.cleaned' }, 10), 'the handler ran after the response';
    is slurp($srv->dir . '/c1.cleaned'), '/cleanup', 'with the environment';
    $srv->stop;
};

done_testing;
