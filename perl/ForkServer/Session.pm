package ForkServer::Session;
use strict;
use warnings;

use POSIX ();

=head1 NAME

ForkServer::Session - make a vassal process the leader of its own session

=head1 SYNOPSIS

  my ($ok, $why) = ForkServer::Session::lead();   # first thing in a new vassal process

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

sub session_id {
    open my $fh, '<', '/proc/self/stat' or return undef;
    my $stat = <$fh>;
    close $fh;
    return undef unless defined $stat;
    $stat =~ s/\A.*\)\s+//s;    # the command name may hold spaces and ')'
    return (split ' ', $stat)[3];    # state ppid pgrp session
}

1;
