package ForkServer::HTTPServer::Handoff;
use strict;
use warnings;

# The workers' shared queue of connections nobody is serving: a worker that
# starts a request gives its other idle connections to it, and whichever
# worker is free (in select(), like on the listener) takes them. A request
# that arrives on a connection kept by a busy worker would otherwise wait
# for that worker while another is free.

use Errno qw(EINTR);
use IO::Handle ();
use Socket qw(AF_UNIX SOCK_DGRAM PF_UNSPEC SOL_SOCKET SCM_RIGHTS MSG_DONTWAIT);
use Socket::MsgHdr ();

use constant {
    BATCH            => 200,           # descriptors per message (the kernel takes 253 at most)
    MSG_CMSG_CLOEXEC => 0x40000000,    # Linux: received descriptors are close-on-exec
};

# Both ends, non-blocking: a worker sends on `give`, every worker receives
# on `take`. A datagram carries its descriptors whole or not at all.
sub pair {
    socketpair(my $take, my $give, AF_UNIX, SOCK_DGRAM, PF_UNSPEC) or die "socketpair: $!\n";
    IO::Handle::blocking($_, 0) for $take, $give;
    return { take => $take, give => $give };
}

# Gives the descriptors away, with one byte of state each; those that went
# are the caller's to close. Returns how many went (the queue may be full).
sub give {
    my ($give, @conns) = @_;    # [fd, state byte], ...
    my $sent = 0;
    while (my @batch = splice(@conns, 0, BATCH)) {
        my $hdr = Socket::MsgHdr->new(buf => pack('C*', map { $_->[1] } @batch));
        $hdr->cmsghdr(SOL_SOCKET, SCM_RIGHTS, pack('i*', map { $_->[0] } @batch));
        my $n = Socket::MsgHdr::sendmsg($give, $hdr, MSG_DONTWAIT);
        last unless defined $n;
        $sent += @batch;
    }
    return $sent;
}

# The descriptors of one message, as [fd, state byte]; () when another
# worker was quicker.
sub take {
    my ($take) = @_;
    my $hdr = Socket::MsgHdr->new(buflen => BATCH, controllen => 16 + 4 * BATCH + 16);
    my $n;
    do { $n = Socket::MsgHdr::recvmsg($take, $hdr, MSG_DONTWAIT | MSG_CMSG_CLOEXEC) }
        while !defined $n && $! == EINTR;
    return () unless $n;
    my @fds;
    my @cmsg = $hdr->cmsghdr;
    while (my ($level, $type, $data) = splice(@cmsg, 0, 3)) {
        push @fds, unpack('i*', $data) if $level == SOL_SOCKET && $type == SCM_RIGHTS;
    }
    my @state = unpack('C*', $hdr->buf);
    return map { [$fds[$_], $state[$_] // 0] } 0 .. $#fds;
}

1;

__END__

=head1 NAME

ForkServer::HTTPServer::Handoff - the workers' queue of idle connections

=head1 FUNCTIONS

=head2 pair() -> { take => $fh, give => $fh }

A non-blocking C<AF_UNIX> datagram socket pair, made by the master (or a
spare) before its workers are forked; every worker holds both ends.

=head2 give($give_fh, [$fd, $state], ...) -> $count

Sends connections (C<SCM_RIGHTS>) with one byte of state each; returns how
many were sent. The sender closes those.

=head2 take($take_fh) -> ([$fd, $state], ...)

The connections of one message; the empty list when there was none.

=cut
