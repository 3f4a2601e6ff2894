use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use POSIX ();
use Time::HiRes ();
use ForkServerTest::HTTP;

# Workers recycled by max-requests while clients keep many connections
# alive and pipeline on them, some requests slow: every request is
# answered, in order, on its own connection (a response may close the
# connection: what the client pipelined after it is sent again). Bounded:
# 6 clients of 6 connections each, for 5 seconds.
my $app = sub {
    my $env = shift;
    my ($id, $ms) = ($env->{QUERY_STRING} // '') =~ /^id=([\w-]+)(?:&ms=(\d+))?$/;
    Time::HiRes::sleep($ms / 1000) if $ms;
    return [200, ['Content-Type' => 'text/plain'], ["id=$id"]];
};
my $srv = start_server(app => $app, workers => 4, max_requests => 15);
ok $srv->wait_ready, 'ready';

my @clients;
for my $client (1 .. 6) {
    pipe(my $r, my $w) or die;
    my $pid = fork // die;
    if ($pid == 0) {
        close $r;
        my ($ok, @bad) = (0);
        my $until = Time::HiRes::time() + 5;
        my @conns = map { [undef, \(my $b = '')] } 1 .. 6;
        my $seq = 0;
        while (Time::HiRes::time() < $until) {
            for my $conn (@conns) {
                $conn->[0] //= connect_to($srv->port);
                ${ $conn->[1] } = '' unless $conn->[0];
                my @ids = map { "$client-" . ++$seq } 1 .. 1 + int rand 3;
                print { $conn->[0] } map { "GET /?id=$_" . (rand() < 0.1 ? '&ms=30' : '') . " HTTP/1.1\r\nHost: x\r\n\r\n" } @ids;
                for my $id (@ids) {
                    my $res = read_response($conn->[0], $conn->[1], timeout => 10);
                    unless ($res) { push @bad, "no response to $id"; undef $conn->[0]; last }
                    if ($res->{body} eq "id=$id") { $ok++ } else { push @bad, "$id answered with $res->{body}" }
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
my ($answered, @bad) = (0);
for (@clients) {
    my ($pid, $r) = @$_;
    my ($ok, @b) = map { chomp; $_ } <$r>;
    waitpid($pid, 0);
    $answered += $ok // 0;
    push @bad, @b;
}
cmp_ok $answered, '>', 100, "requests answered ($answered)";
is scalar(@bad), 0, 'none lost or answered with another\'s response'
    or diag join "\n", @bad[0 .. ($#bad < 9 ? $#bad : 9)];
$srv->stop;
is $srv->wait_exit, 0, 'exit 0';
done_testing;
