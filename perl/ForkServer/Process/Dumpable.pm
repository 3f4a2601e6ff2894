package ForkServer::Process::Dumpable;
use strict;
use warnings;

use POSIX ();
use Socket ();
use ForkServer::Process::Syscalls ();

# The kernel's "dumpable" flag of this process (prctl(2)). It decides who
# may ptrace it, open its /proc/PID files beyond the world-readable ones,
# and take its descriptors (pidfd_getfd): processes of its own uid and gid
# when set, processes with CAP_SYS_PTRACE only when not. Dropping root
# clears it. Why a worker sets it again: docs/security.md.

use constant { PR_GET_DUMPABLE => 3, PR_SET_DUMPABLE => 4, PR_SET_PTRACER => 0x59616d61 };

my $PRCTL = ForkServer::Process::Syscalls::number('prctl');

# 1, 0, or undef where it cannot be read.
sub get {
    return undef unless defined $PRCTL;
    my $r = syscall($PRCTL, PR_GET_DUMPABLE, 0, 0, 0, 0);
    return $r < 0 ? undef : $r == 1 ? 1 : 0;
}

# Sets the flag again in a process that holds no privilege: every uid and
# gid its own (real, effective, saved, file system), none of them 0, no
# capability permitted, effective or ambient, and a uid of its own: not the
# overflow uid (nobody), which unrelated daemons share by design. True
# when it is set. $tracer: the process whose descendants Yama (ptrace_scope
# 1, which admits only ancestors otherwise) is to let take its descriptors.
sub restore_unprivileged {
    my $tracer = shift;
    return 1 if (get() // 0) == 1;
    return 0 unless defined $PRCTL && _unprivileged();
    return 0 unless syscall($PRCTL, PR_SET_DUMPABLE, 1, 0, 0, 0) == 0;
    # an error where Yama is off
    syscall($PRCTL, PR_SET_PTRACER, $tracer, 0, 0, 0) if $tracer;
    return (get() // 0) == 1;
}

# Clears the flag: only processes with CAP_SYS_PTRACE may read this one.
sub clear {
    return defined $PRCTL && syscall($PRCTL, PR_SET_DUMPABLE, 0, 0, 0, 0) == 0;
}

sub _unprivileged {
    open(my $fh, '<', '/proc/self/status') or return 0;
    my %line;
    while (<$fh>) {
        $line{$1} = $2 if /\A(Uid|Gid|CapPrm|CapEff|CapAmb):\s*(.*?)\s*\z/;
    }
    my @ids = (split(' ', $line{Uid} // ''), split(' ', $line{Gid} // ''));
    return 0 unless @ids == 8 && !grep { $_ eq '0' } @ids;
    my %uids = map { $_ => 1 } @ids[0 .. 3];
    my %gids = map { $_ => 1 } @ids[4 .. 7];
    return 0 unless keys %uids == 1 && keys %gids == 1;
    return 0 if $ids[0] == _overflow_uid();
    return 0 if grep { ($line{$_} // '') !~ /\A0+\z/ } qw(CapPrm CapEff CapAmb);
    return 1;
}

# The descriptors this process holds on a file (not a memory file) that is
# not its real uid's and that its real uid and groups may not open as it
# is open, and on no path (a socket, a pipe, an anonymous inode) that is
# not among $given (a hash of /proc/self/fd links, pathless_links()) and
# carries what its uid could not have made: opened while it was root
# ("N (path)" each). Call it after dropping root. A pipe not given may
# lead to a process still root (a helper the app started), so it counts;
# a timer, event, signal, epoll, inotify or pid descriptor gives nothing.
# An empty $given: every such descriptor is judged.
sub foreign_descriptors {
    my ($given) = @_;
    opendir(my $dh, '/proc/self/fd') or return ('/proc/self/fd unreadable');
    my @foreign;
    for my $fd (sort { $a <=> $b } grep { /\A\d+\z/ } readdir $dh) {
        my $path = readlink("/proc/self/fd/$fd") // next;    # the listing's own, closed
        if ($path !~ m{\A/}) {
            next if $given && $given->{$path};
            my $why = $path =~ /\Asocket:/ ? _foreign_socket($fd)
                    : $path =~ /\Aanon_inode:(?:\[(?:timerfd|eventfd|signalfd|eventpoll|pidfd)\]|inotify)\z/ ? undef
                    : $path =~ /\Apipe:/ ? 'a pipe it made as root'
                    : 'made as root';
            push @foreign, "$fd ($path, $why)" if defined $why;
            next;
        }
        next if $path =~ m{\A/memfd:};
        # a file of its own (its requests file, made for it by root)
        my @st = stat("/proc/self/fd/$fd") or next;
        next if $st[4] == $<;
        my $mode = _access_mode($fd) // next;
        # access(2) checks the real uid and groups: the dropped-to user's
        push @foreign, "$fd ($path)" unless -e $path && POSIX::access($path, $mode);
    }
    return @foreign;
}

# The /proc/self/fd links of the descriptors this process holds on no
# path: sockets, pipes, anonymous inodes ("socket:[N]", "pipe:[N]", ...).
sub pathless_links {
    opendir(my $dh, '/proc/self/fd') or return ();
    return grep { defined && !m{\A/} } map { readlink("/proc/self/fd/$_") } grep { /\A\d+\z/ } readdir $dh;
}

# Why socket $fd carries root's rights to whoever holds it, or undef when
# it does not: a TCP or UDP socket gives nothing its uid could not make; a
# UNIX socket connected to a path its uid may connect to neither; any other
# (connected to a root-only path, to a root process by a socket pair, raw,
# netlink: its rights were checked when it was made, as root) does.
sub _foreign_socket {
    my $fd = shift;
    my $dup = POSIX::dup($fd) // return 'unreadable';
    open(my $sock, '+<&=', $dup) or do { POSIX::close($dup); return 'unreadable' };
    my $domain = unpack('i', getsockopt($sock, Socket::SOL_SOCKET(), Socket::SO_DOMAIN()) // pack('i', -1));
    my $type = unpack('i', getsockopt($sock, Socket::SOL_SOCKET(), Socket::SO_TYPE()) // pack('i', -1));
    my $peer = getpeername($sock);
    close $sock;
    if ($domain == Socket::AF_INET() || $domain == Socket::AF_INET6()) {
        return undef if $type == Socket::SOCK_STREAM() || $type == Socket::SOCK_DGRAM();
        return 'a raw socket';
    }
    return "domain $domain" unless $domain == Socket::AF_UNIX();
    my $path = defined $peer && length $peer > 2 ? Socket::unpack_sockaddr_un($peer) : '';
    return 'a UNIX socket with no path' unless length $path && $path !~ /\A\0/;
    return POSIX::access($path, POSIX::W_OK()) ? undef : "connected to $path";
}

# R_OK, W_OK or both, as descriptor $fd is open (its fdinfo flags).
sub _access_mode {
    my $fd = shift;
    open(my $fh, '<', "/proc/self/fdinfo/$fd") or return undef;
    while (<$fh>) {
        next unless /\Aflags:\s*([0-7]+)/;
        my $acc = oct($1) & 3;    # O_ACCMODE
        return $acc == 0 ? POSIX::R_OK() : $acc == 1 ? POSIX::W_OK() : POSIX::R_OK() | POSIX::W_OK();
    }
    return undef;
}

sub _overflow_uid {
    open(my $fh, '<', '/proc/sys/kernel/overflowuid') or return 65534;
    my $uid = <$fh> // '';
    return $uid =~ /\A(\d+)/ ? $1 : 65534;
}

1;

__END__

=head1 NAME

ForkServer::Process::Dumpable - the kernel's "dumpable" flag of this process

=head1 SYNOPSIS

  my $before = ForkServer::Process::Dumpable::get();
  ... setuid ...
  ForkServer::Process::Dumpable::restore_unprivileged() if $before;

=head1 FUNCTIONS

=head2 get() -> 1, 0 or undef

C<prctl(PR_GET_DUMPABLE)>: 1 when processes of this uid and gid may
ptrace it and take its descriptors, 0 when only a process with
C<CAP_SYS_PTRACE> may, undef where it cannot be read.

=head2 foreign_descriptors(\%given) -> ("N (path)", ...)

After dropping root: the descriptors this process holds on a file (not a
pipe or a memory file) that its real uid does not own and could not open
itself, with its groups, for the access it is open for (C<access(2)>),
and on no path but not in C<%given> (L</pathless_links> taken before
the app loaded, and its listening socket): a pipe, a socket other than a
TCP or UDP socket or a UNIX socket connected to a path its uid may
write, an anonymous inode other than a timer, event, signal, epoll,
inotify or pid descriptor. What it opened while it was root. Empty when
it holds none.

=head2 clear() -> bool

C<prctl(PR_SET_DUMPABLE, 0)>.

=head2 pathless_links() -> ("socket:[N]", "pipe:[N]", ...)

The C</proc/self/fd> links of the descriptors this process holds on no
path: sockets, pipes, anonymous inodes.

=head2 restore_unprivileged($tracer) -> bool

C<prctl(PR_SET_DUMPABLE, 1)>, only in a process that holds no privilege:
its four uids one uid, its four gids one gid, none of them 0, no
capability permitted, effective or ambient, and its uid not the overflow uid
(C<nobody>, 65534), which unrelated daemons share. False (and the flag
left alone) otherwise. With C<$tracer> (a pid), also
C<prctl(PR_SET_PTRACER, $tracer)>: where Yama's C<ptrace_scope> is 1,
that process's descendants, not only this one's ancestors, may ptrace it
and take its descriptors. What it exposes: F<docs/security.md>.

=cut
