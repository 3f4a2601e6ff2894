package ForkServer::Process::Dumpable;
use strict;
use warnings;

use ForkServer::Process::Syscalls ();

# The kernel's "dumpable" flag of this process (prctl(2)). It decides who
# may ptrace it, open its /proc/PID files beyond the world-readable ones,
# and take its descriptors (pidfd_getfd): processes of its own uid and gid
# when set, processes with CAP_SYS_PTRACE only when not. Dropping root
# clears it. Why a worker sets it again: docs/security.md.

use constant { PR_GET_DUMPABLE => 3, PR_SET_DUMPABLE => 4 };

my $PRCTL = ForkServer::Process::Syscalls::number('prctl');

# 1, 0, or undef where it cannot be read.
sub get {
    return undef unless defined $PRCTL;
    my $r = syscall($PRCTL, PR_GET_DUMPABLE, 0, 0, 0, 0);
    return $r < 0 ? undef : $r == 1 ? 1 : 0;
}

# Sets the flag again in a process that holds no privilege: every uid and
# gid its own (real, effective, saved, file system), none of them 0, and
# no capability permitted or effective. True when it is set.
sub restore_unprivileged {
    return 1 if (get() // 0) == 1;
    return 0 unless defined $PRCTL && _unprivileged();
    return 0 unless syscall($PRCTL, PR_SET_DUMPABLE, 1, 0, 0, 0) == 0;
    return (get() // 0) == 1;
}

sub _unprivileged {
    open(my $fh, '<', '/proc/self/status') or return 0;
    my %line;
    while (<$fh>) {
        $line{$1} = $2 if /\A(Uid|Gid|CapPrm|CapEff):\s*(.*?)\s*\z/;
    }
    my @ids = (split(' ', $line{Uid} // ''), split(' ', $line{Gid} // ''));
    return 0 unless @ids == 8 && !grep { $_ eq '0' } @ids;
    my %uids = map { $_ => 1 } @ids[0 .. 3];
    my %gids = map { $_ => 1 } @ids[4 .. 7];
    return 0 unless keys %uids == 1 && keys %gids == 1;
    return 0 unless ($line{CapPrm} // '') =~ /\A0+\z/ && ($line{CapEff} // '') =~ /\A0+\z/;
    return 1;
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

=head2 restore_unprivileged() -> bool

C<prctl(PR_SET_DUMPABLE, 1)>, only in a process that holds no privilege:
its four uids one uid, its four gids one gid, none of them 0, and no
capability permitted or effective. False (and the flag left alone)
otherwise. What it exposes: F<docs/security.md>.

=cut
