use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use POSIX ();
use Time::HiRes ();
use ForkServerTest::HTTP;
use ForkServerTest::Pipelining;

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
my ($answered, @bad) = pipelining_load(
    port => $srv->port, clients => 6, conns => 6, seconds => 0.5 + 0.3 * $RELOADS + 0.5,
    batch => sub {
        my ($client, $seq) = @_;
        my ($out, @expected) = ('');
        for (1 .. (1, 1, 2, 3, 5)[rand 5]) {
            my $id = "$client-" . ++$$seq;
            my $q = "id=$id" . (rand() < 0.05 ? '&ms=' . (50, 200, 700)[rand 3] : '');
            my $len = 0;
            if (rand() < 0.1) {
                my $body = 'b' x (rand() < 0.5 ? 70_000 : 300_000);
                $len = length $body;
                $out .= "POST /?$q HTTP/1.1\r\nHost: x\r\nContent-Length: $len\r\n\r\n$body";
            } else {
                $out .= "GET /?$q HTTP/1.1\r\nHost: x\r\n\r\n";
            }
            push @expected, [$id, "id=$id len=$len"];
        }
        return ($out, \@expected);
    },
    meanwhile => sub {
        Time::HiRes::sleep(0.5);    # the load under way: the reloads are its pace, not a wait for anything
        for (1 .. $RELOADS) {
            kill 'HUP', $srv->pid;
            Time::HiRes::sleep(0.3);
        }
    });
cmp_ok $answered, '>', 100, "requests answered ($answered)";
is scalar(@bad), 0, 'none lost, none answered with another\'s response or an error'
    or diag join "\n", scalar(@bad) . ' bad:', @bad[0 .. ($#bad < 14 ? $#bad : 14)];
$srv->stop;
is $srv->wait_exit, 0, 'exit 0';

# A worker of the generation before the last, held in a long request,
# keeps its place on the desk until it is done; the newest worker in that
# place then takes it: a request on its other kept connection, while it
# waits in a long request, is served by its free sibling.
$srv = start_server(app_file => "$FindBin::Bin/apps/http-test.psgi", workers => 2, stop_grace => 1);
ok $srv->wait_ready, 'ready (second server)';
my $dir = $srv->dir;
my @first = $srv->workers;
my $held = connect_to($srv->port);
my $held_buf = '';
print $held "GET /block?held HTTP/1.1\r\nHost: x\r\n\r\n";
ok wait_for(sub { -e "$dir/held.started" }, 20), 'a worker of the first generation waits in a request';
kill 'HUP', $srv->pid;
my %seen = map { $_ => 1 } @first;
ok wait_for(sub { grep { !$seen{$_} } $srv->workers }, 20), 'a second generation';
$seen{$_} = 1 for $srv->workers;
kill 'HUP', $srv->pid;
my @third;
ok wait_for(sub { @third = grep { !$seen{$_} } $srv->workers; @third == 2 }, 20), 'a third one, in the first one\'s places';
open my $go, '>', "$dir/held.go" or die;
close $go;
my $r = read_response($held, \$held_buf, timeout => 20);
like $r && $r->{body} // '', qr/^done held /, 'the held request is answered';
close $held;
my %third = map { $_ => 1 } @third;
ok wait_for(sub { !grep { !$third{$_} } $srv->workers }, 20), 'the older generations are gone';

# A seated worker holds its timer and a copy of its seated sibling's
# (Desk): two each once both sit and watch each other. Until then one
# without a seat gives its quiet connections away at every request.
sub timers_of {
    my $pid = shift;
    opendir(my $dh, "/proc/$pid/fd") or return 0;
    return scalar grep { (readlink("/proc/$pid/fd/$_") // '') eq 'anon_inode:[timerfd]' } readdir $dh;
}
ok wait_for(sub { !grep { timers_of($_) < 2 } @third }, 20), 'both newest workers sit at the desk, watching each other';

# kept connections, by the pid of the worker that answered, until two
# of them are $want's
sub kept_on {
    my ($want) = @_;
    my %by_pid;
    for (1 .. 60) {
        my ($who, $conn) = kept_connection($srv->port, timeout => 10) or next;
        push @{ $by_pid{$who} }, $conn;
        return @{ $by_pid{$want} } if @{ $by_pid{$want} // [] } >= 2;
    }
    return;
}
for my $pid (@third) {
    my ($slow, $fast) = kept_on($pid);
    ok $fast, "two kept connections on $pid" or next;
    print { $slow->[0] } "GET /block?slow$pid HTTP/1.1\r\nHost: x\r\n\r\n";
    ok wait_for(sub { -e "$dir/slow$pid.started" }, 20), '... which waits in a request';
    $r = request_on($fast->[0], $fast->[1], "GET /pid HTTP/1.1\r\nHost: x\r\n\r\n", timeout => 10);
    ok $r && $r->{status} == 200 && $r->{body} ne $pid, '... its other kept connection served by its sibling (on the desk)';
    open my $gate, '>', "$dir/slow$pid.go" or die;
    close $gate;
    $r = read_response($slow->[0], $slow->[1], timeout => 20);
    like $r && $r->{body} // '', qr/^done slow$pid $pid$/, '... and its long request by it';
}
$srv->stop;
is $srv->wait_exit, 0, 'exit 0 (second server)';
done_testing;
