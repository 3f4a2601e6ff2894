package ForkServer::Process::Session;
use strict;
use warnings;

use POSIX ();
use Time::HiRes ();

=head1 NAME

ForkServer::Process::Session - make a vassal process the leader of its own session

=head1 SYNOPSIS

  my ($ok, $why) = ForkServer::Process::Session::lead();   # first thing in a new vassal process

=head1 DESCRIPTION

The Emperor inherits (as child subreaper) whatever a vassal's processes
leave behind, and tells whose it is by session id: a process in the session
of a running vassal is that vassal's and is left alone; one in the session
of a vassal process that has ended is an orphan and is stopped. So every
vassal process started under an Emperor (base, adopted, plain) calls
C<setsid()> first: its session id is its pid, and its workers and any helper
its app forks carry it (unless they call C<setsid()> themselves).

A new session also takes the vassal out of the terminal's process group, so
a Ctrl-C reaches the Emperor alone, which then stops every vassal in order.

=head2 lead() -> ($ok, $why_not)

C<setsid()>; true as well if the process already leads its session (the
Emperor starts plain vassals with C<setsid> itself). Fails, with the reason,
in a process group leader that is not a session leader (e.g. a vassal
started by hand from an interactive shell).

=cut

sub lead {
    my $sid = POSIX::setsid();    # -1 on failure, not undef
    return (1, undef) if defined $sid && $sid > 0;
    my $err = "$!";
    return (1, undef) if (session_id() // -1) == $$;
    return (0, "setsid: $err" . (getpgrp() == $$ ? " (already a process group leader)" : ''));
}

=head2 session_id() -> $sid

The calling process's session id (from F</proc/self/stat>), or undef.

=cut

sub session_id { session_of('self') }

=head2 session_of($pid) -> $sid

A process's session id, from F</proc/PID/stat> (Perl's POSIX has no
C<getsid>), or undef when it is gone.

=cut

sub session_of {
    my ($pid) = @_;
    open my $fh, '<', "/proc/$pid/stat" or return undef;
    my $s = <$fh> // return undef;
    # pid (comm) state ppid pgrp session: comm may hold spaces and parentheses
    return $s =~ /\)\s+\S+\s+-?\d+\s+-?\d+\s+(-?\d+)/ ? $1 : undef;
}

=head2 end_others(%opt) -> $count

Stops every other process of the caller's session: SIGTERM, SIGKILL to
those left after C<grace> seconds (default 2), reaping the caller's own
children meanwhile. Used where no Emperor will do it: a vassal whose
Emperor is gone, a spare that ends without an adoption (the helpers its
worker's warm-up started), a spare's worker whose spare is gone. With
C<leader_only>, only a session leader does it (under plackup the session
is the user's terminal). C<log> is called with one line first, when
anything is left. Returns how many were asked to stop.

=cut

sub end_others {
    my (%o) = @_;
    my $sid = session_id() // return 0;
    return 0 if $o{leader_only} && $sid != $$;
    return 0 if $sid <= 1;    # never the init session
    my @left = _members($sid);
    return 0 unless @left;
    $o{log}->(scalar @left) if $o{log};
    kill 'TERM', @left;
    my $until = Time::HiRes::time() + ($o{grace} // 2);
    while (Time::HiRes::time() < $until) {
        1 while waitpid(-1, POSIX::WNOHANG()) > 0;
        @left = grep { kill(0, $_) && (session_of($_) // 0) == $sid } @left;
        last unless @left;
        Time::HiRes::sleep(0.05);
    }
    kill 'KILL', @left if @left;
    1 while waitpid(-1, POSIX::WNOHANG()) > 0;
    return scalar @left;
}

=head2 die_with_parent($signal, $parent) -> bool

Asks the kernel to send C<$signal> (a number; 0: none) to this process
when its parent, C<$parent>, ends (C<PR_SET_PDEATHSIG>), where the
system call's number is known (x86_64, arm64). False if it could not be
set, or if the parent is already gone (the caller must act on that
itself: the signal would never come).

=cut

my %PRCTL = ('x86_64-linux' => 157, 'aarch64-linux' => 167);

sub die_with_parent {
    my ($signal, $parent) = @_;
    require Config;
    my ($arch) = ($Config::Config{archname} // '') =~ /\A([^-]+-linux)/;
    my $nr = $arch ? $PRCTL{$arch} : undef;
    return 0 unless $nr;
    return 0 unless syscall($nr, 1, $signal, 0, 0, 0) == 0;    # PR_SET_PDEATHSIG
    return !defined $parent || getppid() == $parent;
}

sub _members {
    my ($sid) = @_;
    opendir my $d, '/proc' or return;
    return grep { /\A\d+\z/ && $_ != $$ && (session_of($_) // 0) == $sid } readdir $d;
}

1;
