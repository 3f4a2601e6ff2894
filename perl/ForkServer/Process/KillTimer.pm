package ForkServer::Process::KillTimer;
use strict;
use warnings;

# A POSIX timer of this process whose expiry sends it SIGKILL: a deadline
# no signal mask, no handler and no XS call can put off. The kernel's own
# timer (timer_create with SIGEV_SIGNAL), so nothing else has to watch.

use ForkServer::Process::Syscalls ();

my ($SYS_CREATE, $SYS_SETTIME) = map { ForkServer::Process::Syscalls::number($_) } qw(timer_create timer_settime);
use constant {
    CLOCK_MONOTONIC => 1,
    SIGEV_SIGNAL    => 0,
    SIGKILL         => 9,
};

=head2 new() -> $timer or undef

A disarmed timer, or undef where the system call is not known.

=cut

sub new {
    my ($class) = @_;
    return undef unless defined $SYS_CREATE && defined $SYS_SETTIME;
    # struct sigevent: sigev_value, sigev_signo, sigev_notify, padding to 64 bytes
    my $event = pack('q i i', 0, SIGKILL, SIGEV_SIGNAL) . ("\0" x 48);
    my $id = pack('i', 0);
    syscall($SYS_CREATE, CLOCK_MONOTONIC, $event, $id) == 0 or return undef;
    return bless { id => unpack('i', $id) }, $class;
}

=head2 arm($seconds)

SIGKILL in C<$seconds> (replaces what was armed). C<arm(0)> disarms.

=cut

sub arm {
    my ($self, $seconds) = @_;
    my $s = int $seconds;
    my $spec = pack('q q q q', 0, 0, $s, int(($seconds - $s) * 1e9));    # interval 0: once
    return syscall($SYS_SETTIME, $self->{id}, 0, $spec, 0) == 0;
}

sub disarm { return $_[0]->arm(0) }

1;

__END__

=head1 NAME

ForkServer::Process::KillTimer - a POSIX timer that ends this process with SIGKILL

=head1 SYNOPSIS

  my $timer = ForkServer::Process::KillTimer->new or ...;   # undef: not here
  $timer->arm(2.5);      # SIGKILL in 2.5 s
  $timer->disarm;

=head1 DESCRIPTION

The harakiri backstop of a process with no master to kill it
(L<ForkServer::HTTPServer::Solo>). A timer is not inherited by fork().

=cut
