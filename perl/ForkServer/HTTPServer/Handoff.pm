package ForkServer::HTTPServer::Handoff;
use strict;
use warnings;

# The workers' shared queue of connections nobody is serving: a worker that
# starts a request gives its other idle connections to it, and whichever
# worker is free (in select(), like on the listener) takes them. A request
# that arrives on a connection kept by a busy worker would otherwise wait
# for that worker while another is free.
#
# Beside the queue, a board: one byte per worker, 1 while the worker waits
# in select() with nothing to do. A worker about to start a request gives
# away its connections with a request already waiting in them only when a
# sibling is free to take them at once: under an even load (every worker
# busy) they stay where they are, and hello world pays no hand-over.

use Errno qw(EINTR);
use IO::Handle ();
use Socket qw(AF_UNIX SOCK_DGRAM PF_UNSPEC SOL_SOCKET SCM_RIGHTS MSG_DONTWAIT);
use Socket::MsgHdr ();
use ForkServer::HTTPServer::Desk ();
use ForkServer::HTTPServer::Counts ();
use ForkServer::Process::Syscalls ();

use constant {
    BATCH            => 200,           # descriptors per message (the kernel takes 253 at most)
    MSG_CMSG_CLOEXEC => 0x40000000,    # Linux: received descriptors are close-on-exec
    MFD_CLOEXEC      => 1,
};

# pread/pwrite: each worker writes its own byte at its own offset of the
# one shared file description, which a seek would move under the others.
my ($SYS_PREAD, $SYS_PWRITE, $SYS_MEMFD) = map { ForkServer::Process::Syscalls::number($_) }
    qw(pread64 pwrite64 memfd_create);

my $BOARD_NAME = 'psgi-forkserver-board';

# A memory file (memfd, close-on-exec): nothing on disk, nothing left
# behind, whatever ends the vassal. Undef where it cannot be made.
sub _board {
    return undef unless $SYS_MEMFD;
    my $name = $BOARD_NAME;    # syscall() takes a writable buffer
    my $fd = syscall($SYS_MEMFD, $name, MFD_CLOEXEC);
    return undef unless $fd >= 0 && open(my $board, '+<&=', $fd);
    return $board;
}

# Both ends, non-blocking: a worker sends on `give`, every worker receives
# on `take`. A datagram carries its descriptors whole or not at all.
sub pair {
    socketpair(my $take, my $give, AF_UNIX, SOCK_DGRAM, PF_UNSPEC) or die "socketpair: $!\n";
    IO::Handle::blocking($_, 0) for $take, $give;
    my $desk = ForkServer::HTTPServer::Desk::open_desk();
    # a spare's: its first worker counts its requests there (Counts)
    my $counts = ForkServer::HTTPServer::Counts::requests_memory();
    return { take => $take, give => $give, ($desk ? (desk => $desk) : ()), ($counts ? (counts => $counts) : ()) };
}

# The queue with a board: the master's, made before it forks its workers
# (a spare's first worker, forked before its master ran, has none: it
# neither says it is free nor asks whether a sibling is).
sub with_board {
    my ($take, $give, $desk) = @_;
    my $board = _board();
    return { take => $take, give => $give, ($board ? (board => $board) : ()), ($desk ? (desk => $desk) : ()) };
}

# Marks board byte $index: 1 free (in select(), nothing to do), 0 not.
sub mark {
    my ($handoff, $index, $free) = @_;
    my $board = $handoff->{board} or return;
    my $byte = $free ? "\1" : "\0";    # syscall() takes a writable buffer
    syscall($SYS_PWRITE, fileno($board), $byte, 1, 0 + $index);
    return;
}

# Is a worker other than $index (of $count: both generations' bytes) free?
sub sibling_free {
    my ($handoff, $index, $count) = @_;
    my $board = $handoff->{board} or return 0;
    my $bytes = "\0" x $count;
    my $n = syscall($SYS_PREAD, fileno($board), $bytes, 0 + $count, 0);
    return 0 unless $n > 0;
    substr($bytes, $index, 1) = "\0" if $index < $n;
    return index(substr($bytes, 0, $n), "\1") >= 0 ? 1 : 0;
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

=head2 with_board($take_fh, $give_fh) -> { take, give, board }

The queue with a board (the master's, before it forks its workers): a
memory file (C<memfd>) of one byte per worker, free or not, where the
system's C<memfd_create>, C<pread> and C<pwrite> can be called
(C<syscall.ph>).

=head2 mark($handoff, $index, $free)

Writes worker C<$index>'s byte of the board: free (waiting in C<select()>
with nothing to do) or not.

=head2 sibling_free($handoff, $index, $count) -> bool

Whether a worker other than C<$index>, among the first C<$count> bytes of
the board, is free. False without a board.

=head2 give($give_fh, [$fd, $state], ...) -> $count

Sends connections (C<SCM_RIGHTS>) with one byte of state each; returns how
many were sent. The sender closes those.

=head2 take($take_fh) -> ([$fd, $state], ...)

The connections of one message; the empty list when there was none.

=cut
