use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use ForkServerTest::HTTP;

# Reload and stop, driven through a socketpair standing in for the Emperor
# pipe, with a request in flight. /block?NAME holds a request until the
# test creates NAME.go.
my $app = "$FindBin::Bin/apps/http-test.psgi";

sub touch { open my $fh, '>', $_[0] or die "$_[0]: $!"; close $fh }

# Starts a blocked request; returns its socket once the app is inside it.
sub start_blocked {
    my ($srv, $name) = @_;
    my $s = connect_to($srv->port);
    print $s "GET /block?$name HTTP/1.1\r\nHost: x\r\n\r\n";
    ok wait_for(sub { -e $srv->dir . "/$name.started" }, 10, "$name started"), "request $name in flight";
    return $s;
}

sub finish_blocked {
    my ($srv, $s, $name) = @_;
    touch($srv->dir . "/$name.go");
    my $buf = '';
    return read_response($s, \$buf, timeout => 20);
}

sub get_pid {
    my $r = http_raw($_[0], "GET /pid HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    return $r && $r->{status} == 200 ? $r->{body} : undef;
}

for my $how ('byte 1', 'SIGHUP') {
    subtest "graceful reload via $how" => sub {
        my $srv = start_server(app_file => $app, workers => 2);
        ok $srv->wait_ready, 'ready';
        my @old = $srv->workers;
        is scalar @old, 2, 'two workers';
        my $s = start_blocked($srv, 'r');
        if ($how eq 'SIGHUP') { kill 'HUP', $srv->pid } else { $srv->send_emperor(1) }
        my @now;
        # the idle old worker goes at once, the busy one stays for its request;
        # two new workers start
        ok wait_for(sub {
            @now = $srv->workers;
            my %old = map { $_ => 1 } @old;
            my @new = grep { !$old{$_} } @now;
            @new == 2 && @now == 3;
        }, 10, 'new workers'), 'two new workers, one old busy worker left';
        my %new = map { $_ => 1 } grep { my $p = $_; !grep { $_ == $p } @old } @now;
        my $p = get_pid($srv->port);
        ok $new{$p}, 'new requests served by a new worker';
        my $r = finish_blocked($srv, $s, 'r');
        is $r->{status}, 200, 'in-flight request completed';
        like $r->{body}, qr/^done r (\d+)$/;
        my ($served_by) = $r->{body} =~ /(\d+)$/;
        ok((grep { $_ == $served_by } @old), 'by an old worker');
        is $r->{headers}{connection}, 'close', 'which closed the connection';
        ok wait_for(sub { my @w = $srv->workers; @w == 2 && !grep { !$new{$_} } @w }, 10), 'old worker gone';
        $srv->stop;
        is $srv->wait_exit, 0, 'exit 0';
    };
}

subtest 'reload: an old worker busy past mercy is killed' => sub {
    my $srv = start_server(app_file => $app, workers => 1, mercy => 0.5);
    ok $srv->wait_ready, 'ready';
    my ($old) = $srv->workers;
    my $s = start_blocked($srv, 'k');
    $srv->send_emperor(1);
    ok wait_for(sub { !kill 0, $old }, 10, 'old worker killed'), 'old worker killed after mercy';
    my $buf = '';
    ok !defined read_response($s, \$buf, timeout => 5), 'its connection dropped';
    like get_pid($srv->port), qr/^\d+$/, 'new worker serves';
    like $srv->stderr, qr/worker pid $old still busy 0.5s after reload, killed/, 'logged';
    $srv->stop;
    is $srv->wait_exit, 0, 'exit 0';
};

for my $how ('byte 2', 'EOF', 'SIGTERM') {
    subtest "graceful stop via $how" => sub {
        my $srv = start_server(app_file => $app, workers => 2);
        ok $srv->wait_ready, 'ready';
        my @w = $srv->workers;
        my $s = start_blocked($srv, 's');
        if ($how eq 'byte 2') { $srv->send_emperor(2) }
        elsif ($how eq 'EOF') { $srv->close_emperor }
        else { kill 'TERM', $srv->pid }
        # the idle worker leaves at once; the master waits for the busy one
        ok wait_for(sub { $srv->workers == 1 }, 10), 'idle worker gone';
        ok $srv->running, 'master still waiting for the busy worker';
        my $r = finish_blocked($srv, $s, 's');
        is $r->{status}, 200, 'in-flight request completed';
        is $srv->wait_exit(10), 0, 'then exit 0';
        ok !kill(0, @w), 'workers gone';
    };
}

subtest 'graceful stop: SIGKILL after mercy' => sub {
    my $srv = start_server(app_file => $app, workers => 1, mercy => 0.5);
    ok $srv->wait_ready, 'ready';
    my @w = $srv->workers;
    my $s = start_blocked($srv, 'm');
    $srv->send_emperor(2);
    is $srv->wait_exit(10), 0, 'exit 0 after mercy';
    ok !kill(0, @w), 'stuck worker killed';
    my $buf = '';
    ok !defined read_response($s, \$buf, timeout => 5), 'its connection dropped';
};

# kill -9 of a master (as of an Emperor's whole tree) leaves no worker
# behind: the kernel sends each worker SIGTERM (PR_SET_PDEATHSIG); an idle
# one leaves at once, a busy one after answering its request.
subtest 'workers die with their master (SIGKILL)' => sub {
    my $srv = start_server(app_file => $app, workers => 2);
    ok $srv->wait_ready, 'ready';
    my @w = $srv->workers;
    is scalar @w, 2, 'two workers';
    my $s = start_blocked($srv, 'd');
    kill 'KILL', $srv->pid;
    $srv->wait_exit(10);
    ok wait_for(sub { 1 == grep { kill 0, $_ } @w }, 10, 'idle worker gone'), 'the idle worker exits';
    my $r = finish_blocked($srv, $s, 'd');
    is $r->{status}, 200, 'the busy one answers its request';
    ok wait_for(sub { !grep { kill 0, $_ } @w }, 10, 'busy worker gone'), 'then exits too';
};

for my $how ('byte 0', 'SIGINT', 'SIGQUIT') {
    subtest "stop now via $how" => sub {
        my $srv = start_server(app_file => $app, workers => 2);
        ok $srv->wait_ready, 'ready';
        my @w = $srv->workers;
        my $s = start_blocked($srv, 'n');
        if ($how eq 'byte 0') { $srv->send_emperor(0) }
        else { kill(($how =~ /INT/ ? 'INT' : 'QUIT'), $srv->pid) }
        is $srv->wait_exit(5), 0, 'exit 0 without waiting for the request';
        ok !kill(0, @w), 'workers gone';
    };
}

done_testing;
