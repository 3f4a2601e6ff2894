use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use POSIX ();
use Time::HiRes ();
use ForkServerTest::HTTP;

# Reloads in quick succession (a new generation every 0.3 s, the old ones
# winding down for stop_grace: three generations alive at once, the newest
# in the same desk indexes as the one two before it) while clients keep
# connections alive, pipeline on them and upload bodies: every request is
# answered, in order, on its own connection, and none with another's
# response or with an error made of a body's bytes read as a head. A
# response may close the connection: what the client pipelined after it is
# sent again. Bounded: 6 clients of 6 connections each, 12 reloads.
my $app = sub {
    my $env = shift;
    my ($id, $ms) = ($env->{QUERY_STRING} // '') =~ /^id=([\w-]+)(?:&ms=(\d+))?$/;
    my $len = 0;
    if (my $in = $env->{'psgi.input'}) { while ((my $r = $in->read(my $chunk, 65536)) > 0) { $len += $r } }
    Time::HiRes::sleep($ms / 1000) if $ms;
    return [200, ['Content-Type' => 'text/plain'], ["id=$id len=$len"]];
};
my $srv = start_server(app => $app, workers => 2, stop_grace => 2);
ok $srv->wait_ready, 'ready';

my $RELOADS = 12;
my @clients;
for my $client (1 .. 6) {
    pipe(my $r, my $w) or die;
    my $pid = fork // die;
    if ($pid == 0) {
        close $r;
        srand($client * 7919);
        my ($ok, @bad) = (0);
        my $until = Time::HiRes::time() + 0.5 + 0.3 * $RELOADS + 0.5;
        my @conns = map { [undef, \(my $b = '')] } 1 .. 6;
        my $seq = 0;
        while (Time::HiRes::time() < $until) {
            for my $conn (@conns) {
                $conn->[0] //= connect_to($srv->port);
                ${ $conn->[1] } = '' unless $conn->[0];
                my (@ids, %len);
                my $out = '';
                for (1 .. (1, 1, 2, 3, 5)[rand 5]) {
                    my $id = "$client-" . ++$seq;
                    push @ids, $id;
                    my $q = "id=$id" . (rand() < 0.05 ? '&ms=' . (50, 200, 700)[rand 3] : '');
                    if (rand() < 0.1) {
                        my $body = 'b' x (rand() < 0.5 ? 70_000 : 300_000);
                        $len{$id} = length $body;
                        $out .= "POST /?$q HTTP/1.1\r\nHost: x\r\nContent-Length: $len{$id}\r\n\r\n$body";
                    } else {
                        $len{$id} = 0;
                        $out .= "GET /?$q HTTP/1.1\r\nHost: x\r\n\r\n";
                    }
                }
                # a server that closed the connection early makes the
                # write fail: the responses read say what happened
                local $SIG{PIPE} = 'IGNORE';
                print { $conn->[0] } $out;
                for my $id (@ids) {
                    my $res = read_response($conn->[0], $conn->[1], timeout => 10);
                    unless ($res) { push @bad, "no response to $id"; undef $conn->[0]; last }
                    if ($res->{status} == 200 && $res->{body} eq "id=$id len=$len{$id}") { $ok++ }
                    else { push @bad, "$id answered with $res->{status} $res->{body}" }
                    if (lc($res->{headers}{connection} // '') eq 'close') { undef $conn->[0]; last }
                }
                ${ $conn->[1] } = '' unless $conn->[0];
            }
        }
        print $w join("\n", $ok, @bad), "\n";
        close $w;
        POSIX::_exit(0);
    }
    close $w;
    push @clients, [$pid, $r];
}
Time::HiRes::sleep(0.5);    # the load under way: the reloads are its pace, not a wait for anything
for (1 .. $RELOADS) {
    kill 'HUP', $srv->pid;
    Time::HiRes::sleep(0.3);
}
my ($answered, @bad) = (0);
for (@clients) {
    my ($pid, $r) = @$_;
    my ($ok, @b) = map { chomp; $_ } <$r>;
    waitpid($pid, 0);
    $answered += $ok // 0;
    push @bad, @b;
}
cmp_ok $answered, '>', 100, "requests answered ($answered)";
is scalar(@bad), 0, 'none lost, none answered with another\'s response or an error'
    or diag join "\n", scalar(@bad) . ' bad:', @bad[0 .. ($#bad < 14 ? $#bad : 14)];
$srv->stop;
is $srv->wait_exit, 0, 'exit 0';
done_testing;
