use strict;
use warnings;
use Test::More;
use POSIX ();
use Socket qw(AF_UNIX SOCK_STREAM PF_UNSPEC SOL_SOCKET SCM_RIGHTS);
use Socket::MsgHdr ();
use ForkServer::Output ();
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
        my $took = ForkServer::Output::take_from_config_pipe($vassal);
        close $w;
        ForkServer::Output::statement_flushed();
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

done_testing;
