package ForkServer::Base::Priority;
use strict;
use warnings;

use Config ();

=head1 NAME

ForkServer::Base::Priority - the fork server ahead of the vassals it forks, in the CPU scheduler

=head1 SYNOPSIS

  my $said = ForkServer::Base::Priority::raise(10);   # once, before serving; one phrase for the log
  # a warm spare (ForkServer::Spares), forked from the raised base:
  ForkServer::Base::Priority::raise_group(ForkServer::Base::Priority::raised());      # its session's group
  ForkServer::Base::Priority::raise_process(ForkServer::Base::Priority::raised());    # its waiting worker
  ForkServer::Base::Priority::back($worker_pid);    # adopted: its master, once set up

=head1 DESCRIPTION

Every adopted vassal is forked by the one base, one after the other; in a
mass start the vassals forked so far run their start-up meanwhile, each
a runnable process, and each the leader of a session of its own. Where
Linux groups tasks by session for the scheduler (autogroup,
F</proc/sys/kernel/sched_autogroup_enabled>), each new vassal is a group
weighing as much as the base's whole session: with 50 vassals starting,
the base gets one fiftieth of the CPU and spends most of the burst
runnable but waiting, while the cores are busy with start-ups it has
already served. The mass start then goes at the pace of the base's turns,
not of the machine.

C<raise(N)> gives the base N nice levels: its process (C<setpriority>)
and its session's group (F</proc/self/autogroup>), the group only when the
base leads its session (so no other process's priority changes). It first
sets C<SCHED_RESET_ON_FORK>, so that every process the base forks (a
vassal, a spare, the double fork's intermediate child) starts at nice 0
again, and every new session a vassal makes is a new group at nice 0: the
vassals run as they would without this. The base only works when asked
(an adoption, a spare), so the priority costs nothing while the fleet is
idle.

A warm spare waiting for its adoption is the base's work too: the
adoption's first request runs in it. A spare born of a raised base raises
its session's group by the same levels once it is warm (C<raise_group>:
its warm-up ran at nice 0, as a refill must never slow the fleet), and its
waiting worker raises its own process (C<raise_process>), so that it also
runs ahead of its own master, which sets itself up while the worker starts
serving. Adopted, the master puts both back to nice 0 once it is set up,
before it drops any privilege (C<back>): from then on the vassal runs as
any other; at once when its worker does not serve straight from the
base's request (ForkServer::Spares::Process). Idle, a waiting spare costs
nothing at any priority.

Raising a priority needs the right to (root, C<CAP_SYS_NICE>, or an
C<RLIMIT_NICE> that allows it). Without it, on a base started at another
nice value than 0 (its forks would be reset to 0, not to that value), or
where the scheduler calls are not known (not x86_64 Linux), nothing
changes, and the phrase says why.

=cut

use constant {
    SYS_SCHED_SETSCHEDULER => 144,           # x86_64
    SCHED_OTHER            => 0,
    SCHED_RESET_ON_FORK    => 0x40000000,
    PRIO_PROCESS           => 0,
    AUTOGROUP              => '/proc/self/autogroup',
};

our $RAISED = 0;    # the levels raise() gave this process (inherited by what it forks)

=head2 raise($levels) -> $phrase

Raises the calling process by C<$levels> nice levels (0: nothing is done)
as described above. Returns one phrase for the base's start-up line:
C<priority: nice -10 (and its session's scheduling group)>, or
C<priority: unchanged (WHY)>.

=cut

sub raise {
    my ($levels) = @_;
    return 'priority: unchanged (fork-server-priority = 0)' unless $levels;
    return 'priority: unchanged (not x86_64 Linux)'
        unless $^O eq 'linux' && ($Config::Config{archname} // '') =~ /^x86_64-/;
    my $nice = getpriority(PRIO_PROCESS, 0);
    return "priority: unchanged (started at nice $nice, not 0)" if $nice != 0;
    my $param = pack 'i', 0;
    return "priority: unchanged (sched_setscheduler: $!)"
        if syscall(SYS_SCHED_SETSCHEDULER, 0, SCHED_OTHER | SCHED_RESET_ON_FORK, $param) != 0;
    my $want = -$levels;
    $want = -20 if $want < -20;
    return "priority: unchanged (nice $want: $!)" unless setpriority(PRIO_PROCESS, 0, $want);
    $RAISED = -$want;
    return "priority: nice $want (" . _group($want) . ")";
}

=head2 raised() -> $levels

The levels C<raise> gave this process, or a process forked from it before
(0 when it did not).

=cut

sub raised { return $RAISED }

=head2 raise_group($levels) -> bool, raise_process($levels) -> bool

C<raise_group>: the calling session leader's scheduling group, C<$levels>
nice levels lower. C<raise_process>: the calling process alone, with
C<SCHED_RESET_ON_FORK> (what it forks starts at nice 0). False, and
nothing changed, where it may not (0 levels, no right, no session groups).

=cut

sub raise_group {
    my ($levels) = @_;
    # Only where it can surely be put back: without CAP_SYS_ADMIN the
    # kernel refuses a second change of any group within 0.1 s (EAGAIN),
    # and the vassal would keep the base's priority.
    return 0 unless $levels && -e AUTOGROUP && _enabled() && _may_admin();
    require ForkServer::Process::Session;
    return 0 unless (ForkServer::Process::Session::session_id() // -1) == $$;
    return _write_group(_nice(-$levels));
}

=head2 group_raisable() -> bool, raise_led_group($levels) -> bool

C<raise_group> in two steps, for a process that will lead a session of its
own later (a spare's warm worker that becomes a C<master = false> vassal):
whether it could (asked ahead, while it waits: the files read are not on
its start's path), then the raise itself, once it leads that session.

=cut

sub group_raisable { return -e AUTOGROUP && _enabled() && _may_admin() ? 1 : 0 }

sub raise_led_group {
    my ($levels) = @_;
    return 0 unless $levels;
    return _write_group(_nice(-$levels));
}

sub raise_process {
    my ($levels) = @_;
    return 0 unless $levels && $^O eq 'linux' && ($Config::Config{archname} // '') =~ /^x86_64-/;
    my $param = pack 'i', 0;
    return 0 if syscall(SYS_SCHED_SETSCHEDULER, 0, SCHED_OTHER | SCHED_RESET_ON_FORK, $param) != 0;
    return setpriority(PRIO_PROCESS, 0, _nice(-$levels)) ? 1 : 0;
}

=head2 back($pid)

In a session leader: its session's group back to nice 0 (if it was
raised), and the process C<$pid> of its session (its waiting worker, or
undef) back to nice 0 without C<SCHED_RESET_ON_FORK>. Needs no right but the one the raise had: called
before privileges are dropped.

=cut

sub back {
    my ($pid) = @_;
    if ($pid) {    # a plain process again: nice 0, and no reset flag
        my $param = pack 'i', 0;
        syscall(SYS_SCHED_SETSCHEDULER, $pid, SCHED_OTHER, $param)
            if $^O eq 'linux' && ($Config::Config{archname} // '') =~ /^x86_64-/;
        setpriority(PRIO_PROCESS, $pid, 0);
    }
    _write_group(0) if -e AUTOGROUP && (_group_nice() // 0) < 0;
    return;
}

# CAP_SYS_ADMIN (bit 21) in the effective set.
sub _may_admin {
    open my $fh, '<', '/proc/self/status' or return 0;
    while (my $line = <$fh>) {
        return (hex(substr $1, -8) >> 21) & 1 if $line =~ /\ACapEff:\s*([0-9a-f]+)/;    # the low 32 bits
    }
    return 0;
}

sub _nice { return $_[0] < -20 ? -20 : $_[0] }

sub _write_group {
    my ($nice) = @_;
    open my $fh, '>', AUTOGROUP or return 0;
    my $ok = print {$fh} $nice;
    $ok &&= close $fh;
    return $ok ? 1 : 0;
}

# The nice value of our session's group ("/autogroup-N nice M").
sub _group_nice {
    open my $fh, '<', AUTOGROUP or return undef;
    my $line = <$fh> // '';
    return $line =~ /nice (-?\d+)/ ? $1 : undef;
}

# The session's scheduling group (autogroup): only our own session's, and
# only where the kernel groups by session at all.
sub _group {
    my ($nice) = @_;
    return 'no session groups' unless -e AUTOGROUP && _enabled();
    require ForkServer::Process::Session;
    return 'not leading its session: its group unchanged'
        unless (ForkServer::Process::Session::session_id() // -1) == $$;
    open my $fh, '>', AUTOGROUP or return "its session's group unchanged: $!";
    my $ok = print {$fh} $nice;
    $ok &&= close $fh;
    return $ok ? "and its session's scheduling group" : "its session's group unchanged: $!";
}

sub _enabled {
    open my $fh, '<', '/proc/sys/kernel/sched_autogroup_enabled' or return 0;
    my $on = <$fh> // 0;
    return $on + 0;
}

1;
