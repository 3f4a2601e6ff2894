package ForkServer::Link;
use strict;
use warnings;

use Socket qw(SOL_SOCKET SCM_RIGHTS MSG_PEEK MSG_TRUNC MSG_DONTWAIT MSG_NOSIGNAL);
use Socket::MsgHdr ();

=head1 NAME

ForkServer::Link - one message with descriptors over a SOCK_SEQPACKET socket

=head1 SYNOPSIS

  ForkServer::Link::send_fds($sock, $bytes, @fds) or die "send: $!";
  my ($bytes, @fds) = ForkServer::Link::recv_fds($sock);   # () at end of file

=head1 DESCRIPTION

How a base talks to its spares, and a spare to its waiting worker
(L<ForkServer::Spares>): a message is sent whole or not at all, its
descriptors (C<SCM_RIGHTS>) with it. Received descriptors are
close-on-exec.

=cut

use constant MSG_CMSG_CLOEXEC => 0x40000000;    # Linux: received descriptors are close-on-exec

=head2 send_fds($sock, $bytes, @fds) -> bool

True when the whole message went. A peer that is gone is a false
return, with C<$!> set (C<EPIPE>), never a SIGPIPE.

=cut

sub send_fds {
    my ($sock, $data, @fds) = @_;
    my $hdr = Socket::MsgHdr->new(buf => $data);
    $hdr->cmsghdr(SOL_SOCKET, SCM_RIGHTS, pack 'i*', @fds) if @fds;
    # MSG_NOSIGNAL rather than SIGPIPE ignored for the call: six system
    # calls fewer on each of an adoption's hand-overs
    my $n = Socket::MsgHdr::sendmsg($sock, $hdr, MSG_NOSIGNAL);
    return defined $n && $n == length $data;
}

=head2 recv_fds($sock) -> ($bytes, @fds)

The next message and its descriptors; the empty list at end of file or on
an error (C<$!>).

=head2 recv_fds_now($sock) -> ($bytes, @fds)

The same without waiting: the empty list with C<$!> set to C<EAGAIN> when
no message is there yet (end of file: the empty list, C<$!> 0).

=cut

sub recv_fds_now { return _recv_fds($_[0], MSG_DONTWAIT) }

# The message's size first, then a buffer of that size: Socket::MsgHdr
# clears the buffer it is given, and one as large as the largest message
# (64 KB) cost 16 to 64 page faults on every adoption.
sub recv_fds { return _recv_fds($_[0], 0) }

sub _recv_fds {
    my ($sock, $flags) = @_;
    my $size = _restarted(sub { Socket::MsgHdr::recvmsg($sock, Socket::MsgHdr->new(buflen => 1),
                                                        MSG_PEEK | MSG_TRUNC | $flags) })
        // return;
    if ($size == 0) { $! = 0; return }    # end of file
    my $hdr = Socket::MsgHdr->new(buflen => $size, controllen => 256);
    my $n = _restarted(sub { Socket::MsgHdr::recvmsg($sock, $hdr, MSG_CMSG_CLOEXEC | $flags) }) // return;
    return if $n == 0;
    my @fds;
    my @cmsg = $hdr->cmsghdr;
    while (my ($level, $type, $data) = splice @cmsg, 0, 3) {
        push @fds, unpack 'i*', $data if $level == SOL_SOCKET && $type == SCM_RIGHTS;
    }
    return ($hdr->buf, @fds);
}

# A signal with a Perl handler (the app's own, in a spare's waiting worker)
# interrupts a wait that may last hours: it is no end of file.
sub _restarted {
    my ($call) = @_;
    while (1) {
        my $r = $call->();
        return $r if defined $r || !$!{EINTR};
    }
}

1;
