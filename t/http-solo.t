use strict;
use warnings;
use Test::More;
use File::Temp ();
use Time::HiRes ();
use FindBin;
use lib "$FindBin::Bin/lib";
use ForkServerTest::HTTP;

# solo => 1 (a vassal's master = false): the process serves its connections
# itself and keeps the master's duties on the Emperor pipe.
my $app = "$FindBin::Bin/apps/http-test.psgi";

sub get_pid {
    my ($port) = @_;
    my $r = http_raw($port, "GET /pid HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    return $r && $r->{status} == 200 ? $r->{body} : undef;
}

# A process with max_requests 1 that has served its request and sent
# byte 22 (replace me).
sub asked_after_one_request {
    my %opts = @_;
    my $srv = start_server(app_file => $app, solo => 1, max_requests => 1, %opts);
    ok $srv->wait_ready, 'ready';
    is get_pid($srv->port), $srv->pid, 'its one request';
    ok $srv->wait_emperor_byte(22), 'byte 22';
    return $srv;
}

subtest 'the process serves itself: bytes 5 and 17, no worker, heartbeat' => sub {
    my $srv = start_server(app_file => $app, solo => 1, heartbeat => 0.2);
    ok $srv->wait_ready, 'byte 17 (loyal)';
    is get_pid($srv->port), $srv->pid, 'answered by the process itself';
    is scalar(my @w = $srv->workers), 0, 'no worker';
    ok $srv->wait_emperor_byte(26, 5, 2), 'heartbeats (byte 26)';
    $srv->stop;
    is $srv->wait_exit, 0, 'SIGTERM: exit 0';
};

subtest 'max_requests: byte 22, then it serves on until the stop byte' => sub {
    my $srv = start_server(app_file => $app, solo => 1, max_requests => 2);
    ok $srv->wait_ready, 'ready';
    is get_pid($srv->port), $srv->pid, "request $_" for 1 .. 2;
    ok $srv->wait_emperor_byte(22), 'byte 22: replace me';
    # no moment with nobody accepting while its successor starts
    is get_pid($srv->port), $srv->pid, 'a request after asking: served by the process itself';
    ok $srv->running, 'still there, waiting for its stop';
    $srv->send_emperor(2);
    is $srv->wait_exit, 0, 'byte 2: exit 0';
};

subtest 'psgix.harakiri.commit while it serves on after byte 22: it accepts nothing more' => sub {
    my $srv = asked_after_one_request(mercy => 30);
    my $r = http_raw($srv->port, "GET /commit HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    is $r && $r->{body}, "bye ${\ $srv->pid}", 'the committing request, served by it';
    my $s = connect_to($srv->port);
    print $s "GET /pid HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    my $buf = '';
    ok !defined read_response($s, \$buf, timeout => 2), 'a request after the commit: not taken (it waits for the successor)';
    $srv->send_emperor(2);
    is $srv->wait_exit, 0, 'byte 2: exit 0';
    close $s;
};

subtest 'the Emperor gone while it serves on after byte 22: a graceful stop, not mercy later' => sub {
    my $srv = asked_after_one_request(mercy => 30);
    my $t0 = Time::HiRes::time();
    $srv->close_emperor;
    is $srv->wait_exit(20), 0, 'exit 0';
    cmp_ok Time::HiRes::time() - $t0, '<', 5, 'without waiting out mercy';
};

subtest 'a storm of SIGHUP: one byte 22, and it serves on until the stop byte' => sub {
    my $srv = start_server(app_file => $app, solo => 1, mercy => 30);
    ok $srv->wait_ready, 'ready';
    kill 'HUP', $srv->pid for 1 .. 50;
    ok $srv->wait_emperor_byte(22), 'byte 22';
    is get_pid($srv->port), $srv->pid, 'served by itself after the storm';
    kill 'HUP', $srv->pid for 1 .. 50;
    is get_pid($srv->port), $srv->pid, 'and after another';
    my $n = () = $srv->emperor_bytes(0.05) =~ /\x16/g;
    is $n, 1, 'asked once';
    $srv->send_emperor(2);
    is $srv->wait_exit, 0, 'byte 2: exit 0';
};

subtest 'max_requests and no answer: it stops mercy seconds after asking' => sub {
    my $srv = asked_after_one_request(mercy => 1);
    is $srv->wait_exit(20), 0, 'exit 0 without a stop byte';
};

subtest 'SIGTERM while it waits for its stop after byte 22: it goes at once' => sub {
    my $srv = asked_after_one_request(mercy => 30);
    my $t0 = Time::HiRes::time();
    kill 'TERM', $srv->pid;
    is $srv->wait_exit(20), 0, 'exit 0';
    cmp_ok Time::HiRes::time() - $t0, '<', 5, 'without waiting out mercy';
};

subtest 'the Emperor gone (end of file): a graceful stop' => sub {
    my $srv = start_server(app_file => $app, solo => 1);
    ok $srv->wait_ready, 'ready';
    $srv->close_emperor;
    is $srv->wait_exit, 0, 'exit 0';
};

subtest 'harakiri: logged, exit status 86' => sub {
    my $srv = start_server(app_file => $app, solo => 1, harakiri => 1);
    ok $srv->wait_ready, 'ready';
    my $r = http_raw($srv->port, "GET /hang HTTP/1.1\r\nHost: x\r\n\r\n", timeout => 20);
    ok !defined $r, 'stuck request: connection closed without a response';
    is $srv->wait_exit >> 8, 86, 'exit status 86';
    like $srv->stderr, qr/testapp: harakiri: worker 1 \(pid ${\ $srv->pid}\) stuck more than 1s in "GET \/hang HTTP\/1.1"/,
        'logged with the request';
};

subtest 'harakiri when the Perl handler cannot run: SIGKILL a second later' => sub {
    my $srv = start_server(app_file => $app, solo => 1, harakiri => 1);
    ok $srv->wait_ready, 'ready';
    my $r = http_raw($srv->port, "GET /hang-hard HTTP/1.1\r\nHost: x\r\n\r\n", timeout => 20);
    ok !defined $r, 'stuck request: connection closed without a response';
    is $srv->wait_exit & 127, 9, 'killed by its own timer (SIGKILL)';
};

subtest 'without an Emperor: SIGHUP opens the access log again, the process goes on' => sub {
    my $dir = File::Temp::tempdir(CLEANUP => 1);
    my $file = "$dir/access.log";
    open my $log, '>>', $file or die $!;
    my $srv = start_server(app_file => $app, solo => 1, emperor_fh => undef,
                           access_log => $log, access_log_path => $file);
    ok wait_for(sub { get_pid($srv->port) }, 10), 'serving';
    rename $file, "$file.1" or die $!;
    kill 'HUP', $srv->pid;
    my $n = 0;
    ok wait_for(sub { get_pid($srv->port); -s $file }, 10), 'lines go to a new file at the path';
    is get_pid($srv->port), $srv->pid, 'the same process serves';
    like slurp("$file.1"), qr{"GET /pid HTTP/1\.1" 200 }, 'the rotated file kept its lines';
    $srv->stop;
    is $srv->wait_exit, 0, 'exit 0';
};

subtest 'more than one worker needs the master' => sub {
    my $err = eval { ForkServer::HTTPServer->new(app => sub { [200, [], []] }, solo => 1, workers => 2); 1 } ? '' : $@;
    like $err, qr/^master = false serves with one process: processes = 2 needs the master/, 'refused';
};

done_testing;
