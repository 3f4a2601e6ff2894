package ForkServer::Base::Clients;
use strict;
use warnings;

use Errno qw(EMFILE ENFILE);
use IO::Handle ();
use IO::Socket::UNIX ();
use Socket qw(SOL_SOCKET SOCK_STREAM SO_PEERCRED SOMAXCONN);
use Time::HiRes ();
use ForkServer::Base::Request ();

=head1 NAME

ForkServer::Base::Clients - the base's fork-server socket and the adoption requests being read

=head1 SYNOPSIS

  # methods of the base (ForkServer::Base inherits them)
  $base->listen;                 # binds fork-server, mode fork-server-mode
  $base->accept_clients;         # its socket is readable
  $base->client_readable($req);  # a client's socket is readable: a complete request goes to $base->adopt
  $base->expire_clients;         # drops those past fork-server-timeout
  $base->refuse($req, $why);     # closes what it brought, one line

=head1 DESCRIPTION

Binds the C<fork-server> UNIX socket (mode C<fork-server-mode>, default
0600; never another fork server's live socket) and reads adoption requests
(PROTOCOL.md sections 2 to 4) from peers whose uid (SO_PEERCRED) is in
C<fork-server-allow-uid>, at most C<MAX_PENDING> at once, each within
C<fork-server-timeout> seconds. A refused request closes every descriptor
it brought and logs one line.

Out of descriptors (C<EMFILE>, C<ENFILE>), the base does not spin on its
listening socket, which stays readable while accept fails: it gives up a
spare descriptor kept for this, accepts and closes one waiting client (the
requester sees the connection closed without a pid), takes the spare back,
logs one line for the whole episode, and stops watching the socket for a
while (0.1 s, doubling up to 2 s while it lasts).

These are methods of L<ForkServer::Base>'s object: they use its config,
its loop's C<select>, its C<clients>, C<log> and C<adopt>.

=cut

use constant MAX_PENDING => 64;    # clients being read at once; more are refused
use constant PAUSE_FIRST => 0.1;   # out of descriptors: the listening socket rests this long,
use constant PAUSE_MAX   => 2;     # doubling up to this

sub listen {
    my ($self) = @_;
    my $path = $self->{path} = $self->{config}->get('fork-server');
    if (-e $path || -l $path) {
        die "fork-server path '$path' exists and is not a socket\n" unless -S $path;
        # Never steal the socket of a fork server that is alive.
        die "another fork server is listening on '$path'\n"
            if IO::Socket::UNIX->new(Peer => $path, Type => SOCK_STREAM);
        unlink $path or die "cannot remove stale socket '$path': $!\n";
    }
    # Created with no access for others, then set to the wanted mode: there
    # is no moment where the socket is more open than asked.
    my $umask = umask 0177;
    my $sock = IO::Socket::UNIX->new(Local => $path, Type => SOCK_STREAM, Listen => SOMAXCONN);
    my $err = $!;
    umask $umask;
    die "cannot listen on fork-server socket '$path': $err\n" unless $sock;
    my $mode = $self->{config}->get('fork-server-mode');
    chmod $mode, $path or die "chmod fork-server socket '$path': $!\n";
    setsockopt($sock, SOL_SOCKET, SO_PASSCRED(), 1) or die "SO_PASSCRED: $!\n";
    $sock->blocking(0);
    $self->{listen} = $sock;
    $self->_take_spare;
    return;
}

# One descriptor kept in reserve: out of descriptors, it is given up to
# accept (and close) one client, so the client is refused rather than left
# waiting in the backlog.
sub _take_spare {
    my ($self) = @_;
    open($self->{spare}, '<', '/dev/null') or delete $self->{spare};
    return;
}

# Socket.pm exports SO_PASSCRED only in recent versions.
sub SO_PASSCRED { eval { Socket::SO_PASSCRED() } // 16 }

sub accept_clients {
    my ($self) = @_;
    my $accepted = 0;
    # core accept: a plain handle, not an IO::Socket object, whose making
    # (IO::Handle->new, a symbol in Symbol's stash, autoflush, a blessing)
    # writes to pages of the base shared with every vassal, on each request
    while (accept(my $client, $self->{listen})) {
        $accepted++;
        my ($pid, $uid) = unpack 'i I', getsockopt($client, SOL_SOCKET, SO_PEERCRED) // '';
        my $peer = "pid " . ($pid // '?') . " uid " . ($uid // '?');
        if (!defined $uid || !$self->{allow}{$uid}) {
            $self->log("refused connection from $peer: uid not allowed");
            close $client;    # before reading: nothing it sent is received
            next;
        }
        if (keys %{ $self->{clients} } >= MAX_PENDING) {
            $self->log("refused connection from $peer: " . MAX_PENDING . " requests pending");
            close $client;
            next;
        }
        IO::Handle::blocking($client, 0);
        my $req = ForkServer::Base::Request->new(
            sock     => $client,
            peer     => $peer,
            peer_pid => $pid,
            deadline => Time::HiRes::time() + $self->{config}->get('fork-server-timeout'),
        );
        $self->{clients}{ fileno $client } = $req;
        $self->{select}->add($client);
        # the Emperor sends its request right after connecting: it is
        # usually here already, and read now saves a turn of the loop
        $self->client_readable($req);
    }
    if ($! == EMFILE || $! == ENFILE) {
        $self->_out_of_descriptors("$!");
    }
    elsif ($accepted && $self->{short_of_fds}) {
        $self->log("descriptors available again: accepting requests");
        delete @{$self}{qw(short_of_fds pause)};
    }
    return;
}

# accept() failed for lack of descriptors: the socket stays readable, so
# without this the loop would spin at 100 % CPU.
sub _out_of_descriptors {
    my ($self, $err) = @_;
    my $refused = 0;
    if ($self->{spare}) {
        close delete $self->{spare};
        if (accept(my $client, $self->{listen})) {
            close $client;    # the requester sees EOF without a pid
            $refused = 1;
        }
        $self->_take_spare;
    }
    my $pause = $self->{pause} = $self->{pause} ? _min($self->{pause} * 2, PAUSE_MAX) : PAUSE_FIRST;
    unless ($self->{short_of_fds}++) {
        $self->log("out of descriptors ($err): refusing requests"
            . ($refused ? "" : " (none refused: no spare descriptor)")
            . "; accepting again once descriptors are free");
    }
    $self->{select}->remove($self->{listen});
    $self->{paused_until} = Time::HiRes::time() + $pause;
    return;
}

sub _resume_listening {
    my ($self) = @_;
    return unless $self->{paused_until} && Time::HiRes::time() >= $self->{paused_until};
    delete $self->{paused_until};
    $self->{select}->add($self->{listen});
    return;
}

sub _min { $_[0] < $_[1] ? $_[0] : $_[1] }

sub client_readable {
    my ($self, $req) = @_;
    my $state = eval { $req->read_some };
    return $self->refuse($req, $@) unless $state;
    return if $state eq 'more';
    if ($state eq 'gone') { $self->forget($req); $req->close_all; return }
    $self->forget($req);
    $self->adopt($req);
    return;
}

sub expire_clients {
    my ($self) = @_;
    my $now = Time::HiRes::time();
    for my $req (values %{ $self->{clients} }) {
        $self->refuse($req, "no complete request after " . $self->{config}->get('fork-server-timeout') . " s")
            if $req->deadline <= $now;
    }
    return;
}

sub forget {
    my ($self, $req) = @_;
    $self->{select}->remove($req->sock);
    delete $self->{clients}{ fileno $req->sock };
    return;
}

sub refuse {
    my ($self, $req, $why) = @_;
    $self->forget($req);
    my $fds = () = $req->fds;
    $req->close_all;
    $self->log("refused request from " . $req->peer . " ($fds descriptors closed): $why");
    return;
}

1;
