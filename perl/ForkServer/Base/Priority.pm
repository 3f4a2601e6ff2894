package ForkServer::Base::Priority;
use strict;
use warnings;

use Config ();

=head1 NAME

ForkServer::Base::Priority - the fork server ahead of the vassals it forks, in the CPU scheduler

=head1 SYNOPSIS

  my $said = ForkServer::Base::Priority::raise(10);   # once, before serving; one phrase for the log

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
    return "priority: nice $want (" . _group($want) . ")";
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
