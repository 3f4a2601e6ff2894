package ForkServerTest::Pipelining;
use strict;
use warnings;
use Exporter 'import';
use POSIX ();
use Time::HiRes ();
use ForkServerTest::HTTP qw(connect_to read_response);

our @EXPORT = qw(pipelining_load);

# pipelining_load(port => P, clients => N, conns => M, seconds => S,
#                 batch => sub { my ($client, $seq_ref) = @_; ... return ($bytes, [[$id, $body], ...]) },
#                 meanwhile => sub { ... })
#
# N forked clients keep M connections each alive for S seconds and
# pipeline on them what `batch` returns: every request must be answered
# 200, in order, on its own connection, with the body `batch` expects. A
# response with `Connection: close` ends its connection: what was
# pipelined after it is sent again on a new one. `meanwhile` runs in the
# caller while the clients do (reloads, say). Returns how many were
# answered as expected, then a line for each that was not.
sub pipelining_load {
    my (%a) = @_;
    my @clients;
    for my $client (1 .. $a{clients}) {
        pipe(my $r, my $w) or die "pipe: $!";
        my $pid = fork // die "fork: $!";
        if ($pid == 0) {
            close $r;
            srand($client * 7919);
            print $w join("\n", _client($client, %a)), "\n";
            close $w;
            POSIX::_exit(0);
        }
        close $w;
        push @clients, [$pid, $r];
    }
    $a{meanwhile}->() if $a{meanwhile};
    my ($answered, @bad) = (0);
    for (@clients) {
        my ($pid, $r) = @$_;
        my ($ok, @b) = map { chomp; $_ } <$r>;
        waitpid($pid, 0);
        $answered += $ok // 0;
        push @bad, @b;
    }
    return ($answered, @bad);
}

sub _client {
    my ($client, %a) = @_;
    my ($ok, @bad) = (0);
    my $until = Time::HiRes::time() + $a{seconds};
    my @conns = map { [undef, \(my $b = '')] } 1 .. $a{conns};
    my $seq = 0;
    # a server that closed the connection early makes the write fail: the
    # responses read say what happened
    local $SIG{PIPE} = 'IGNORE';
    while (Time::HiRes::time() < $until) {
        for my $conn (@conns) {
            $conn->[0] //= connect_to($a{port});
            ${ $conn->[1] } = '' unless $conn->[0];
            my ($out, $expected) = $a{batch}->($client, \$seq);
            print { $conn->[0] } $out;
            for (@$expected) {
                my ($id, $body) = @$_;
                my $res = read_response($conn->[0], $conn->[1], timeout => 10);
                unless ($res) { push @bad, "no response to $id"; undef $conn->[0]; last }
                if ($res->{status} == 200 && $res->{body} eq $body) { $ok++ }
                else { push @bad, "$id answered with $res->{status} $res->{body}" }
                if (lc($res->{headers}{connection} // '') eq 'close') { undef $conn->[0]; last }
            }
            ${ $conn->[1] } = '' unless $conn->[0];
        }
    }
    return ($ok, @bad);
}

1;
