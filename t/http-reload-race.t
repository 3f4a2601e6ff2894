use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use IO::Socket::INET ();
use POSIX ();
use ForkServerTest::HTTP;

# Gap-free reload under load: many graceful reloads while a client opens
# connection after connection. Every connection a worker accepted must get
# its answer: no reset, no close without a response. (A worker used to exit
# from its SIGTERM handler when "idle", which could fall between accept()
# and the moment it marked itself busy.)
my $reloads = $ENV{RELOAD_RACE_ROUNDS} // 60;
my $srv = start_server(app_file => "$FindBin::Bin/apps/http-test.psgi", workers => 2, access_log => undef);
ok $srv->wait_ready, 'ready';

# The client: a child process, so that it keeps connecting while this
# process drives reloads. It stops when its control pipe reaches end of
# file, and reports "OK FAILED first-failure" on its result pipe.
pipe(my $ctl_r, my $ctl_w) or die "pipe: $!";
pipe(my $res_r, my $res_w) or die "pipe: $!";
my $client = fork // die "fork: $!";
if ($client == 0) {
    close $ctl_w; close $res_r;
    my ($ok, $failed, $first) = (0, 0, '');
    while (1) {
        my $rin = '';
        vec($rin, fileno $ctl_r, 1) = 1;
        last if select(my $rout = $rin, undef, undef, 0) > 0;    # end of file: done
        my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $srv->port, Timeout => 10);
        my $res = $s && eval {
            syswrite $s, "GET /pid HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
            my $buf = '';
            read_response($s, \$buf, timeout => 20);
        };
        my $err = $s ? "$!" : "connect: $@";
        if ($res && $res->{status} == 200 && $res->{body} =~ /^\d+$/) { $ok++ }
        else { $failed++; $first ||= $@ || ($res ? "status $res->{status}" : "no response ($err)") }
        close $s if $s;
    }
    $first =~ s/\s+/ /g;
    syswrite $res_w, "$ok $failed $first\n";
    POSIX::_exit(0);
}
close $ctl_r; close $res_w;

my $done = 0;
for my $round (1 .. $reloads) {
    my %before = map { $_ => 1 } $srv->workers;
    $srv->send_emperor(1);
    # the next round once a whole new generation is there and the old gone
    last unless wait_for(sub {
        my @now = $srv->workers;
        @now == 2 && !grep { $before{$_} } @now;
    }, 20, "new workers after reload $round");
    $done++;
}
is $done, $reloads, "$reloads graceful reloads";

close $ctl_w;
my $line = <$res_r> // '';
waitpid $client, 0;
my ($ok, $failed, $first) = $line =~ /^(\d+) (\d+) ?(.*)$/;
ok defined $ok && $ok > 0, "the client was served (" . ($ok // '?') . " requests)";
is $failed, 0, 'no connection reset or dropped during the reloads' or diag "first failure: $first";

$srv->stop;
is $srv->wait_exit, 0, 'exit 0';
done_testing;
