package ForkServer::Process::Limits;
use strict;
use warnings;

use POSIX ();
use ForkServer::Process::Syscalls ();

use constant RLIMIT_NPROC => 6;

=head1 NAME

ForkServer::Process::Limits - resource limits a vassal sets on itself before it drops root

=head1 SYNOPSIS

  my $set = ForkServer::Process::Limits::set_nproc(1024);   # the limit now in force, or undef
  my $n = ForkServer::Process::Limits::machine_share();    # the default: a quarter of pid_max / threads-max

=head1 DESCRIPTION

C<RLIMIT_NPROC> is the kernel's cap on the processes (threads included) of
one real uid: a C<fork> by a process whose uid already has that many fails
with C<EAGAIN>. It is counted per user across the machine, not per vassal,
and root (or any holder of C<CAP_SYS_RESOURCE> or C<CAP_SYS_ADMIN>) is not
held to it; so it bounds a tenant that has a uid of its own.

=head2 set_nproc($n) -> $limit or undef

Sets the soft and the hard limit to C<$n> (the hard one too: a dropped
process cannot raise it again), or to the hard limit already in force when
that is lower (raising it needs root). The limit set, or undef (no
C<prlimit64> here, or the kernel refused: C<$!>).

=cut

sub set_nproc {
    my ($n) = @_;
    my $call = ForkServer::Process::Syscalls::number('prlimit64') // do { $! = POSIX::ENOSYS(); return undef };
    my $old = "\0" x 16;
    syscall($call, 0, RLIMIT_NPROC, 0, $old) == 0 or return undef;
    my (undef, $hard) = unpack 'QQ', $old;
    $n = $hard if $hard < $n;
    my $new = pack 'QQ', $n, $n;
    syscall($call, 0, RLIMIT_NPROC, $new, 0) == 0 or return undef;
    return $n;
}

=head2 machine_share() -> $n

A quarter of the machine's process slots: the lower of
C</proc/sys/kernel/pid_max> and C</proc/sys/kernel/threads-max>, over 4
(0 when neither can be read). A fixed number would be wrong one way or the
other: one uid often runs a whole fleet (300 vassals of 4 processes), and
C<pid_max> is 32768 on some hosts and 4194304 on others; a quarter lets a
big fleet under one uid fit and leaves three quarters to everyone else
when a tenant's app forks without end.

=cut

sub machine_share {
    my @max = grep { defined && /^\d+$/ } map { _read_first_line($_) } qw(
        /proc/sys/kernel/pid_max /proc/sys/kernel/threads-max);
    return 0 unless @max;
    my ($low) = sort { $a <=> $b } @max;
    return int($low / 4);
}

sub _read_first_line {
    my ($path) = @_;
    open my $fh, '<', $path or return undef;
    my $line = <$fh>;
    chomp $line if defined $line;
    return $line;
}

1;
