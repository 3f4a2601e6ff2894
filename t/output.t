use strict;
use warnings;
use Test::More;
use POSIX ();
use Socket qw(AF_UNIX SOCK_STREAM PF_UNSPEC SOL_SOCKET SCM_RIGHTS);
use Socket::MsgHdr ();
use ForkServer::Vassal::Output ();
use ForkServer::Protocol qw(encode_packet read_packet);

# The config packet carries the output pipe as SCM_RIGHTS (psgi_forkserver
# launch.send_config); the vassal moves it onto descriptors 1 and 2, and the
# packet is still there for its reader.
sub child_output {
    my (%args) = @_;
    socketpair(my $emp, my $vassal, AF_UNIX, SOCK_STREAM, PF_UNSPEC) or die "socketpair: $!";
    pipe(my $r, my $w) or die "pipe: $!";
    my $packet = encode_packet(115, 0, "[uwsgi]\nname = x\n");
    my $hdr = Socket::MsgHdr->new(buf => $packet);
    $hdr->cmsghdr(SOL_SOCKET, SCM_RIGHTS, pack('i', fileno $w)) if $args{with_fd};
    Socket::MsgHdr::sendmsg($emp, $hdr) == length $packet or die "sendmsg: $!";
    my $pid = fork // die "fork: $!";
    if (!$pid) {
        close $r;
        unless ($args{with_fd}) {    # not the TAP stream, nor the test's stderr
            open(STDOUT, '>', '/dev/null');
            open(STDERR, '>', '/dev/null');
        }
        my $took = ForkServer::Vassal::Output::take_from_config_pipe($vassal);
        close $w;
        ForkServer::Vassal::Output::statement_flushed();
        print STDOUT "took=$took\n";
        print STDERR "a", "b", "\n";
        my (undef, undef, $body) = read_packet($vassal);
        print STDOUT "body=", length $body, "\n";
        POSIX::_exit(0);
    }
    close $w;
    my $out = do { local $/; <$r> };
    waitpid $pid, 0;
    is $?, 0, 'child exit status';
    return $out;
}

is child_output(with_fd => 1), "took=1\nab\nbody=17\n",
    'a descriptor with the packet becomes stdout and stderr; the packet stays whole';
is child_output(with_fd => 0), '', 'no descriptor: stdout and stderr are left alone';

# Perl's STDERR starts unbuffered: `print STDERR "a", "b\n"` is then two
# write(2)s, and another worker's line can come between them on the shared
# pipe. Afterwards: buffered, flushed at the end of each statement.
subtest 'one write per print statement' => sub {
    # a fresh perl: its STDERR is the initial, unbuffered one
    (my $lib = $INC{'ForkServer/Vassal/Output.pm'}) =~ s{/ForkServer/Vassal/Output\.pm\z}{};
    my $code = <<'PERL';
use constant PERLIO_F_UNBUF => 0x10000;    # perliol.h
sub unbuf { my @d = PerlIO::get_layers(STDERR, details => 1); return $d[-1] & PERLIO_F_UNBUF ? 1 : 0 }
my $before = unbuf();
ForkServer::Vassal::Output::statement_flushed();
# autoflush() sets $| and returns what it was: what statement_flushed set
print "$before ", unbuf(), " ", (STDERR->autoflush ? 1 : 0), " ", (STDOUT->autoflush ? 1 : 0), "\n";
PERL
    open(my $from, '-|', $^X, "-I$lib", '-MForkServer::Vassal::Output', '-e', $code) or die "perl: $!";
    my $got = <$from>;
    close $from;
    is $got, "1 0 1 1\n", 'STDERR unbuffered before, then buffered; both flushed per statement';
};

done_testing;
