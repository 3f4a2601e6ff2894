package ForkServer::Vassal::Output;
use strict;
use warnings;

use POSIX ();
use Socket qw(SOL_SOCKET SCM_RIGHTS MSG_PEEK);
use Socket::MsgHdr ();

=head1 NAME

ForkServer::Vassal::Output - take the output pipe the Emperor sent with the config

=head1 SYNOPSIS

  ForkServer::Vassal::Output::take_from_config_pipe($config_fh);   # before reading the packet

=head1 DESCRIPTION

The Emperor owns each vassal process's output: its stdout and stderr are a
pipe the Emperor reads, which timestamps each line and names its vassal
(psgi_forkserver/logs.py). A spawned vassal has the pipe as descriptors 1
and 2 from birth. An adopted one inherits the base's; the Emperor sends its
pipe as SCM_RIGHTS with the first bytes of the config packet (an adoption
request carries at most three descriptors, none free for it).

C<take_from_config_pipe> peeks at the config pipe (MSG_PEEK: the packet
stays for L<ForkServer::Vassal::EmperorPipe> to read), and if a descriptor came with
it, makes it descriptors 1 and 2. Returns whether a pipe was taken.

=cut

use constant CONTROL_LEN => 64;

=head2 statement_flushed()

STDOUT and STDERR written once per print statement: STDOUT is
block-buffered on a pipe (an app's C<print> would sit there), and Perl's
STDERR is unbuffered, which writes C<print STDERR "a", "b\n"> as three
write(2)s that another worker's line can come between. Both become
buffered with autoflush: each statement is one write(2), whole (below
PIPE_BUF) even when several processes share the pipe.

=cut

sub statement_flushed {
    STDOUT->autoflush(1);
    STDERR->flush;
    # a fresh :perlio layer in place of STDERR's (flagged unbuffered)
    if ((PerlIO::get_layers(STDERR))[-1] eq 'perlio') {
        binmode(STDERR, ':pop') && binmode(STDERR, ':perlio');
    }
    STDERR->autoflush(1);
    return;
}

sub take_from_config_pipe {
    my ($fh) = @_;
    my $hdr = Socket::MsgHdr->new(buflen => 1, controllen => CONTROL_LEN);
    my $n;
    do { $n = Socket::MsgHdr::recvmsg($fh, $hdr, MSG_PEEK) } while (!defined $n && $!{EINTR});
    return 0 unless $n;
    my @fds;
    my @cmsg = $hdr->cmsghdr;
    while (my ($level, $type, $data) = splice @cmsg, 0, 3) {
        push @fds, unpack 'i*', $data if $level == SOL_SOCKET && $type == SCM_RIGHTS;
    }
    return 0 unless @fds;
    my $fd = shift @fds;
    POSIX::close($_) for @fds;
    STDOUT->flush;
    STDERR->flush;
    POSIX::dup2($fd, 1) // die "dup2 of the output pipe to descriptor 1: $!\n";
    POSIX::dup2($fd, 2) // die "dup2 of the output pipe to descriptor 2: $!\n";
    POSIX::close($fd);
    return 1;
}

1;
