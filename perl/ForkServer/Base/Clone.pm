package ForkServer::Base::Clone;
use strict;
use warnings;

use Config ();
use POSIX ();

=head1 NAME

ForkServer::Base::Clone - fork a child that is born the child of our own parent (clone with CLONE_PARENT)

=head1 SYNOPSIS

  my ($ok, $why) = ForkServer::Base::Clone::probe();   # once, at start-up
  my $pid = ForkServer::Base::Clone::clone_parent();   # like fork: undef, 0 in the child, the pid in the caller
  # the child's parent (getppid) is the caller's parent; the caller never reaps it
  my ($pid, $placed, $refused) = ForkServer::Base::Clone::clone_parent_into($cgroup_fd);
  # the same, born in the cgroup whose directory $cgroup_fd is (clone3)

=head1 DESCRIPTION

The fork server's adopted vassal must end up the Emperor's child. uWSGI
forks twice and lets the kernel reparent the grandchild to the Emperor (a
subreaper): two forks of a big process, one after the other, on the path
of every adoption. C<clone(CLONE_PARENT)> gives the same result with one:
the child is the Emperor's child from birth, and the fork server has no
intermediate process to wait for.

A raw C<clone> bypasses glibc's C<fork()>, so this module does by hand what
glibc and Perl's C<pp_fork> do and matters here:

=over

=item *

glibc records the new process's thread id in its thread control block
(C<CLONE_CHILD_SETTID>); without it, code that asks glibc for "my thread id"
would get the fork server's. The field's address is the TCB (the C<fs>
base, C<arch_prctl(ARCH_GET_FS)>) plus an offset found by L</probe>: the one
place in the first kilobyte of the TCB that holds our C<gettid()>, checked
by a test child at start-up.

=item *

Perl flushes every output buffer before forking (or the child would write
the same bytes again): we let Perl do it with an C<exec> that cannot
succeed (C<exec> flushes all handles first, and fails on a directory).

=item *

Perl blocks every signal across the fork; so do we, so no signal lands
between the clone and the child's own handlers.

=item *

glibc's C<pthread_atfork> handlers do not run. They exist to make locks
held by other threads safe in the child; L</probe> refuses a process with
more than one thread, and a single-threaded process holds no lock while it
runs Perl code. C<$$>, C<getppid>, C<kill>, C<alarm> ask the kernel every
time (glibc caches no pid since 2.25).

=back

x86_64 Linux only (syscall numbers, the C<fs> register); elsewhere
L</probe> says no and the caller double-forks.

=cut

use constant {
    SYS_CLONE          => 56,
    SYS_CLONE3         => 435,
    CLONE_INTO_CGROUP  => 1 << 33,        # Linux 5.7
    SYS_ARCH_PRCTL     => 158,
    SYS_RT_SIGPROCMASK => 14,
    SIG_BLOCK          => 0,
    SIG_SETMASK        => 2,
    SYS_GETTID         => 186,
    ARCH_GET_FS        => 0x1003,
    CLONE_PARENT       => 0x00008000,
    CLONE_CHILD_SETTID => 0x01000000,
    SIGCHLD            => 17,
    TCB_SCAN_BYTES     => 1024,    # struct pthread is larger; glibc 2.36 keeps tid at 720
};

my $TID_OFFSET;    # set by a successful probe()

sub _read_int { unpack 'i', unpack('P4', pack 'Q', $_[0]) }

sub _fs_base {
    my $buf = pack 'Q', 0;
    return undef unless syscall(SYS_ARCH_PRCTL, ARCH_GET_FS, $buf) == 0;
    return unpack 'Q', $buf;
}

sub _tid_address {
    my $fs = _fs_base() or return undef;
    return $fs + $TID_OFFSET;
}

=head2 probe() -> ($ok, $why_not)

Checks that clone_parent() can be used in this process and finds the TCB
offset of glibc's thread id. Forks one test child (reaped here): cloned with
C<CLONE_CHILD_SETTID> at that address, it checks the field holds its own
thread id. Returns false and the reason if anything is off.

=cut

sub probe {
    undef $TID_OFFSET;
    return (0, "not x86_64 Linux") unless $^O eq 'linux' && ($Config::Config{archname} // '') =~ /^x86_64-/;
    my $threads = () = glob '/proc/self/task/*';
    return (0, "$threads threads (atfork handlers would be needed)") if $threads != 1;
    my $fs = _fs_base() or return (0, "arch_prctl(ARCH_GET_FS): $!");
    my $tid = syscall(SYS_GETTID);
    return (0, "gettid: $!") if $tid <= 0;
    my @at = grep { _read_int($fs + $_) == $tid } map { $_ * 4 } 0 .. TCB_SCAN_BYTES / 4 - 1;
    return (0, "thread id found " . @at . " times in the thread control block") unless @at == 1;
    $TID_OFFSET = $at[0];

    # A test child, our own (no CLONE_PARENT): is the field its thread id?
    my $pid = _clone(CLONE_CHILD_SETTID | SIGCHLD);
    if (!defined $pid) { my $e = $!; undef $TID_OFFSET; return (0, "clone: $e") }
    if ($pid == 0) {
        my $ok = _read_int($fs + $TID_OFFSET) == syscall(SYS_GETTID)
              && $$ == syscall(SYS_GETTID) && $$ != getppid();
        POSIX::_exit($ok ? 0 : 1);
    }
    my $got = waitpid $pid, 0;
    my $status = $?;
    if ($got != $pid || $status != 0) { undef $TID_OFFSET; return (0, "the test child failed (status $status)") }
    return (1, "thread id at TCB offset $at[0]");
}

=head2 clone_parent(%o) -> $pid

After a successful probe(): a child whose parent is our parent. Returns
undef (and sets C<$!>) on failure, 0 in the child, the child's pid in the
caller. The caller gets no SIGCHLD for it and must not wait for it.

With C<in_child =E<gt> [$object, $method, @args]>, the child calls
C<< $object->$method(@args) >> at once, which must not return, instead of
returning 0: a child that never comes back to its caller need not unwind
the caller's subs, and each sub left writes to pages the child shares with
the base (its pad, its depth, the frees of its variables), which the
kernel then copies.

=cut

sub clone_parent {
    my (%o) = @_;
    die "BUG: clone_parent without a successful probe\n" unless defined $TID_OFFSET;
    return _clone(CLONE_PARENT | CLONE_CHILD_SETTID | SIGCHLD, $o{in_child});
}

=head2 clone_parent_into($cgroup_fd) -> ($pid, $placed, $refused)

clone_parent(), the child born in the cgroup (v2) whose directory
C<$cgroup_fd> is open on (C<clone3> with C<CLONE_INTO_CGROUP>, Linux 5.7):
it never runs a single instruction elsewhere, and whoever wanted it there
has no process to move. C<$placed> says it is there. Where the kernel
refuses C<clone3> or the flag (an older kernel, a seccomp filter: ENOSYS,
EPERM, EINVAL, E2BIG), this falls back to clone_parent(), C<$placed> false
and C<$refused> the reason, once: from then on every call is a plain
clone_parent(), said by the caller in one line. Where it refuses this
cgroup (not a cgroup, no right to it, a cgroup that cannot hold
processes), this call falls back the same way and says why; the next
tries clone3 again.

=cut

my $CLONE3_REFUSED;    # why clone3 into a cgroup cannot be used here

sub clone_parent_into {
    my ($cgroup_fd, %o) = @_;    # %o: in_child, as for clone_parent()
    die "BUG: clone_parent_into without a successful probe\n" unless defined $TID_OFFSET;
    return (clone_parent(%o), 0, undef) if $CLONE3_REFUSED || !defined $cgroup_fd;
    my $tid_addr = _tid_address() or return (undef, 0, undef);
    # struct clone_args (88 bytes, CLONE_ARGS_SIZE_VER2): flags, pidfd,
    # child_tid, parent_tid, exit_signal (0: with CLONE_PARENT the child's
    # parent gets the base's own exit signal, SIGCHLD), stack, stack_size
    # (0, 0: a copy of our stack, as after fork()), tls, set_tid,
    # set_tid_size, cgroup
    my $args = pack 'Q11', CLONE_PARENT | CLONE_CHILD_SETTID | CLONE_INTO_CGROUP, 0, $tid_addr,
        0, 0, 0, 0, 0, 0, 0, $cgroup_fd;
    my $pid = _with_signals_blocked($o{in_child}, SYS_CLONE3, $args, length $args);
    return ($pid, 1, undef) if defined $pid;
    # running out of processes or memory is the fork's own failure, not clone3's
    return (undef, 0, undef) if $!{EAGAIN} || $!{ENOMEM};
    if ($!{ENOSYS} || $!{EPERM} || $!{EINVAL} || $!{E2BIG}) {
        $CLONE3_REFUSED = "clone3(CLONE_INTO_CGROUP) refused: $!; vassals are moved into their cgroups "
                        . "by the Emperor from now on";
        return (clone_parent(%o), 0, $CLONE3_REFUSED);
    }
    my $why = "clone3(CLONE_INTO_CGROUP) into the requested cgroup: $!; this vassal is moved by the Emperor";
    return (clone_parent(%o), 0, $why);
}

sub _clone {
    my ($flags, $in_child) = @_;
    my $tid_addr = _tid_address() or return undef;
    # stack 0: the child runs on a copy of our stack, as after fork()
    return _with_signals_blocked($in_child, SYS_CLONE, $flags, 0, 0, $tid_addr, 0);
}

# Every signal, for rt_sigprocmask (the kernel leaves SIGKILL and SIGSTOP alone).
my $ALL_SIGNALS = pack 'Q', ~0;
my $OLD_MASK = pack 'Q', 0;    # syscall() writes the old mask into this string

# Runs the clone system call as Perl's fork would: output flushed, every
# signal blocked across it. Its pid (0 in the child), or undef and $!.
# The mask is set with the system call itself rather than POSIX's sigsets:
# no objects made, blessed and freed on either side of the clone. The
# child restores its mask and, given $in_child, runs it (no return).
sub _with_signals_blocked {
    my ($in_child, $number, @args) = @_;
    { no warnings 'exec'; exec { '/' } '/' }    # fails, having flushed every output handle
    syscall(SYS_RT_SIGPROCMASK, SIG_BLOCK, $ALL_SIGNALS, $OLD_MASK, 8);
    my $pid = syscall($number, @args);
    if ($pid == 0) {
        syscall(SYS_RT_SIGPROCMASK, SIG_SETMASK, $OLD_MASK, 0, 8);
        _run_in_child(@$in_child) if $in_child;
        return 0;
    }
    my $err = $!;
    syscall(SYS_RT_SIGPROCMASK, SIG_SETMASK, $OLD_MASK, 0, 8);
    $! = $err;
    return $pid < 0 ? undef : $pid;
}

sub _run_in_child {
    my ($object, $method, @args) = @_;
    $object->$method(@args);
    die "BUG: $method returned in a cloned child\n";
}

1;
