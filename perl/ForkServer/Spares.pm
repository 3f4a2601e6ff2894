package ForkServer::Spares;
use strict;
use warnings;

use IO::Select ();
use POSIX ();
use Socket qw(AF_UNIX SOCK_SEQPACKET PF_UNSPEC MSG_DONTWAIT);
use Time::HiRes ();
use ForkServer::Base::Clone ();
use ForkServer::Link ();
use ForkServer::Log ();
use ForkServer::Protocol qw(encode_packet encode_array MODIFIER1_FORK_SERVER);
use ForkServer::Base::Request ();
use ForkServer::Process::Random ();
use ForkServer::Spares::Rehearsal ();
use ForkServer::Process::Session ();
use ForkServer::Spares::Worker ();

=head1 NAME

ForkServer::Spares - warm spare vassals kept by the base, adopted without a fork

=head1 SYNOPSIS

  # in the base (ForkServer::Base), under an Emperor, fork-server-spares = K:
  my $pool = ForkServer::Spares->new(base => $base, count => $k);
  $pool->watch_with($select);                          # the base's IO::Select: the spares' links join it
  $pool->make_one if !$pending && $pool->wants_one;   # refill, one at a time, when idle
  $pool->readable($fh) if $pool->owns($fh);           # a spare is ready, or gone
  $pool->take($request) or fork_as_today($request);   # hand an adoption to a ready spare

=head1 DESCRIPTION

A spare is a process made from the base exactly like an adopted vassal
(C<clone(CLONE_PARENT)>, or the double fork to the subreaper): it is the
Emperor's child from birth. It holds nothing of the base's (no fork-server
socket, no Emperor pipe, no client) and no socket anyone can connect to:
it cannot accept a connection before it is adopted. It keeps one
C<SOCK_SEQPACKET> link to the base. Like every vassal process it leads
its own session (L<ForkServer::Process::Session>) from birth, so the worker it
forks is in the session the vassal will have. Until it is adopted, the
Emperor knows it by its title, C<psgi-vassal NAME (spare of BASEPID)>
(C<, warming)> until its worker is warm): it
is neither an orphan nor a stranger (orphans.py), and C<emperor status>
counts it, with its worker, under its base.

At birth the spare forks its first worker, which runs the base's
C<early-warmup> paths and L<ForkServer::Spares::Rehearsal>'s worker part, three
times (its own lazily built state and copy-on-write faults happen then, not
on the first real request), tells the spare, and waits. The spare runs its
own rehearsal, then tells the base C<R PID> and waits on its link.

The base sends the requester the pid reply with the spare's pid itself,
then hands the spare the adoption packet with the request's descriptors in
one message on the link (L<ForkServer::Link>); the spare checks it again
with L<ForkServer::Base::Request> and becomes the vassal exactly as a
forked one does (L<ForkServer::Base>'s C<_become_vassal>: its argv and
config; its session it already leads), except that its first worker already exists: it gets
the listening socket, the argv and the config text, applies C<env>,
C<chdir>, C<gid>/C<uid> itself and starts accepting
(L<ForkServer::HTTPServer/run_preforked_worker>); workers beyond the first
are forked then. A config with C<psgi> (an app on top of the base) lets the
waiting worker go and forks fresh workers from the loaded app.

The base hands over only requests whose argv has no C<--psgi> and is not a
test file (C<emperor prove>); the others, and every request while no spare
is ready, are served with the fork as before. Spares are made one at a time,
only when no adoption is being read, and not before 0.1 s after the last
adoption (by a spare or a fork: L</hold_off()>): refilling never delays an
adoption, a burst of them, nor the start of the vassals just adopted.

End of file on the link (the base stopped or died, or a deploy replaced
it) ends a waiting spare, and its worker with it (end of file on their own
link), a warming one too. A spare that dies is noticed by the base (end of
file on its side) and replaced.

A spare that cannot warm up (its worker dies in the app's warm-up, or is
still warming after C<fork-server-spare-timeout> seconds and is killed)
tells the base why (C<E PID WHY>); the base logs one line and makes the
next spare 1 s later, then twice as late each time up to C<BACKOFF_MAX>,
until one is warm: an app whose warm-up exits or hangs in a forked process
costs one process at a time, not a fork loop. The pool stops short of
C<count> where the base's descriptor limit would leave fewer than
C<fd_reserve> descriptors for adoptions (one line). A vassal that fails
before its warm worker got the socket takes the worker with it; one whose
worker died just before its adoption forks fresh workers. A waiting spare
whose worker dies does not leave on its own: the base may have answered an
adoption with its pid and not yet sent it. It tells the base (C<G PID>) and
waits: for the adoption, or for the end of file the base gives a spare it
has forgotten. Signals the
app handles (inherited by spares and their workers) interrupt no wait.

=cut

use constant RETRY_AFTER  => 1;      # seconds before another try after a spare could not be made
use constant BACKOFF_MAX  => 60;     # a spare that cannot warm up: the wait before the next one doubles up to this
use constant WORKER_GONE  => 'G';    # spare to base: forget me, unless my pid is already given
use constant REFILL_PAUSE => 0.1;    # after an adoption, its vassal starts before a new spare competes for the CPU

sub new {
    my ($class, %args) = @_;
    my $self = bless { %args, spares => {} }, $class;    # fileno of our link => spare
    my @paths = $args{base}{config}->list('early-warmup');
    $self->{paths} = $args{base}{app} ? \@paths : [];
    $self->{warm_timeout} = $args{base}{config}->get('fork-server-spare-timeout');
    $self->{fd_reserve} //= 16;
    return $self;
}

sub log { my ($self, $msg) = @_; ForkServer::Log::line($self->{base}{name}, $msg) }

sub watch_with { $_[0]{select} = $_[1]; return }

sub owns    { my $fd = fileno $_[1]; defined $fd && exists $_[0]{spares}{$fd} }    # a link closed by take() is no one's
sub size    { scalar keys %{ $_[0]{spares} } }
sub ready   { scalar grep { $_->{ready} } values %{ $_[0]{spares} } }

=head2 wants_one() -> bool

True when the pool is short and no spare is still warming (spares are made
one at a time, so a burst of adoptions never competes with several).

=cut

sub wants_one {
    my ($self) = @_;
    return 0 if $self->size >= $self->{count};
    return 0 if grep { !$_->{ready} } values %{ $self->{spares} };
    return 0 if $self->{retry_at} && Time::HiRes::time() < $self->{retry_at};
    return 1;
}

=head2 next_at() -> $time or undef

When the base's loop must wake up to make a spare that waits for a pause.

=cut

sub next_at {
    my ($self) = @_;
    return undef unless $self->{retry_at} && $self->size < $self->{count};
    # Once past, the pause is no reason to wake: the loop makes a spare
    # before it waits, or a warming spare's link or a client's deadline
    # wakes it. A past time would make select() return at once, and the
    # base spin through every warm-up of a refill (retry_at stays set).
    return undef if $self->{retry_at} <= Time::HiRes::time();
    return $self->{retry_at};
}

=head2 make_one()

One new spare, born as an adopted vassal would be. The base's caller does
this only when no adoption is being read.

=cut

sub make_one {
    my ($self) = @_;
    my $base = $self->{base};
    socketpair(my $ours, my $theirs, AF_UNIX, SOCK_SEQPACKET, PF_UNSPEC)
        or return $self->_failed("socketpair: $!");
    return $self->_no_room($ours, $theirs) if $self->_short_of_descriptors;
    my $pid;
    if ($base->{clone}) {
        $pid = ForkServer::Base::Clone::clone_parent();
        return $self->_failed("clone: $!") unless defined $pid;
        if ($pid == 0) { close $ours; $self->_spare_main($theirs) }
    }
    else {
        $pid = fork;
        return $self->_failed("fork: $!") unless defined $pid;
        if ($pid == 0) {
            my $spare = fork;
            POSIX::_exit(defined $spare ? 0 : 1) unless defined $spare && $spare == 0;
            close $ours;
            $self->_spare_main($theirs);
        }
        $base->{children}++;    # the intermediate child, reaped by the base
        undef $pid;             # the spare's own pid comes with its R message
    }
    close $theirs;
    $self->_add($ours, $pid);
    # the fork shared our pages again: the next adoption's path is copied now
    ForkServer::Spares::Rehearsal::adoption_request() for 1 .. ForkServer::Spares::Rehearsal::TIMES;
    return;
}

# A spare's link joins the pool (its pid comes later with the double fork).
sub _add {
    my ($self, $link, $pid) = @_;
    $self->{spares}{ fileno $link } = { link => $link, pid => $pid, born => Time::HiRes::time() };
    $self->{select}->add($link);
    return;
}

# Each spare holds one of the base's descriptors (its link): a pool larger
# than the descriptor limit allows would leave none for the adoptions
# themselves (a client and up to three descriptors each, MAX_PENDING of
# them), and every adoption would be refused. The pool stops at what fits.
sub _short_of_descriptors {
    my ($self) = @_;
    my $limit = POSIX::sysconf(POSIX::_SC_OPEN_MAX()) or return 0;
    opendir(my $dh, '/proc/self/fd') or return 0;
    my $open = grep { /\A\d+\z/ } readdir $dh;    # counted, not the highest: closed clients leave holes
    return $open - 1 > $limit - $self->{fd_reserve};    # less the directory's own
}

sub _no_room {
    my ($self, @fhs) = @_;
    close $_ for @fhs;
    my $asked = $self->{count};
    $self->{count} = $self->size;
    $self->log("spares: $self->{count}, not $asked: the descriptor limit ("
        . POSIX::sysconf(POSIX::_SC_OPEN_MAX()) . ") keeps $self->{fd_reserve} for adoptions");
    return;
}

sub _failed {
    my ($self, $why) = @_;
    $self->log("cannot make a spare ($why): retrying in " . RETRY_AFTER . " s");
    $self->{retry_at} = Time::HiRes::time() + RETRY_AFTER;
    return;
}

=head2 readable($fh)

A spare's link is readable: C<R PID> (it is warm and waits), C<E PID WHY>
(it could not warm up and ends), or end of file (it is gone; another is
made later). A spare that ends before it is warm makes the next one wait,
1 s then twice as long each time up to C<BACKOFF_MAX>: an app whose
warm-up kills or wedges a forked process would otherwise have the base
make spares in a loop.

=cut

sub readable {
    my ($self, $fh) = @_;
    return unless $self->owns($fh);
    my $s = $self->{spares}{ fileno $fh };
    # never blocks the base: a link is read both from its loop and from
    # take(), and the loop may hold a readiness that take() already used
    my $msg = '';
    my $n = defined recv($fh, $msg, 4096, MSG_DONTWAIT) ? length $msg : undef;
    return if !defined $n && ($!{EINTR} || $!{EAGAIN});
    if ($n && $msg =~ /\AR(\d+)\z/) {
        @$s{qw(ready pid)} = (1, $1);
        delete $self->{backoff};
        $self->log("spares: $self->{count} ready") if $self->ready == $self->{count};
        return;
    }
    my $why = $n && $msg =~ /\AE(\d+) (.*)\z/s ? do { $s->{pid} //= $1; $2 } : undef;
    $self->_forget($s);
    close $s->{link};    # the spare waits for this (end of file) to leave
    my $pid = $s->{pid} // '?';
    return $self->log("spare pid $pid lost its worker before it was adopted")
        if $s->{ready} && $n && $msg =~ /\A${\WORKER_GONE}\d+\z/;
    return $self->log("spare pid $pid ended before it was adopted") if $s->{ready};
    my $wait = $self->{backoff} = $self->{backoff} ? _min(2 * $self->{backoff}, BACKOFF_MAX) : RETRY_AFTER;
    $self->{retry_at} = Time::HiRes::time() + $wait;
    $why //= 'it ended';
    $why =~ s/\s+\z//;
    $why =~ s/\s*\n\s*/ /g;
    $self->log("spare pid $pid could not warm up ($why): next spare in $wait s");
    return;
}

sub _min { $_[0] < $_[1] ? $_[0] : $_[1] }

sub _forget {
    my ($self, $s) = @_;
    $self->{select}->remove($s->{link});
    delete $self->{spares}{ fileno $s->{link} };
    return;
}

=head2 fits($request) -> bool

Whether a spare may serve this adoption, judged on its argv alone.

=cut

sub fits {
    my ($class, $req) = @_;
    my (undef, @argv) = $req->argv;
    return 0 if ($argv[0] // '') eq '--test-file';
    return 0 if grep { /\A--?psgi(?:=|\z)/ } @argv;
    return 1;
}

=head2 take($request) -> bool

Serves a complete adoption request with the oldest ready spare: the base
sends the pid reply itself (the requester does not wait for the spare to
wake up), then hands the spare the packet and the request's descriptors.
True when the request is done with (the base then closes its copies of
the descriptors); false when the base must fork as before (no spare
ready, or a request that does not fit).

=cut

sub take {
    my ($self, $req) = @_;
    return 0 unless $self->fits($req);
    $self->_notice_ends;    # never reply with the pid of a spare that just died
    my ($s) = sort { $a->{born} <=> $b->{born} } grep { $_->{ready} } values %{ $self->{spares} };
    return 0 unless $s;
    if (!eval { $req->reply_pid($s->{pid}); 1 }) {
        (my $why = $@) =~ s/\s+\z//;
        $self->log("request from " . $req->peer . " dropped, the spare kept: $why");
        return 1;
    }
    $self->_forget($s);
    my $packet = encode_packet(MODIFIER1_FORK_SERVER, $req->mask, encode_array($req->argv));
    # Rare (the spare died after _notice_ends): it ends on end of file, and
    # the Emperor, which has its pid, sees its vassal die and starts it again.
    ForkServer::Link::send_fds($s->{link}, $packet, $req->fds)
        or $self->log("spare pid $s->{pid} could not be given its request ($!): it ends");
    close $s->{link};    # it is no spare of ours any more
    return 1;
}

=head2 hold_off()

An adoption was served (by a spare or a fork): the next spare waits until
none has come for REFILL_PAUSE. A burst of adoptions, and the vassals just
adopted, go first: a clone and a warm-up would take the CPU from them.

=cut

sub hold_off {
    my ($self) = @_;
    my $at = Time::HiRes::time() + REFILL_PAUSE;
    # never sooner than a back-off after a spare that could not warm up
    $self->{retry_at} = $at unless $self->{retry_at} && $self->{retry_at} > $at;
    return;
}

# Links with something to read (end of file: the spare is gone) are read
# now rather than on the loop's next turn.
sub _notice_ends {
    my ($self) = @_;
    my @links = map { $_->{link} } values %{ $self->{spares} };
    return unless @links;
    $self->readable($_) for IO::Select->new(@links)->can_read(0);
    return;
}

=head2 close_links()

Closes every link: in the base at shutdown (each waiting spare then ends),
and in every process forked from the base, which must not hold them.

=cut

sub close_links {
    my ($self) = @_;
    close $_->{link} for values %{ $self->{spares} };
    $self->{spares} = {};
    return;
}

# ---------------------------------------------------------------------------
# The spare process
# ---------------------------------------------------------------------------

sub _spare_main {
    my ($self, $link) = @_;
    my $base = $self->{base};
    my $name = $base->{name};
    ForkServer::Process::Random::reseed();
    # Its own session first, as every vassal process: its first worker is
    # forked below and must be in the session the vassal will have.
    my ($leads, $why) = ForkServer::Process::Session::lead();
    ForkServer::Log::line($name, "spare pid $$ is not a session leader ($why)") unless $leads;
    # Born the Emperor's child (clone): when it dies, so does the spare,
    # and what its worker's warm-up started (leave()).
    if ($base->{clone}) {
        $SIG{TERM} = sub { leave(0) };
        leave(0) unless ForkServer::Process::Session::die_with_parent(POSIX::SIGTERM(), $base->{parent});
    }
    my $warm;
    my $ok = eval {
        $base->_close_base;    # and the other spares' links, with the pool
        # The Emperor tells a spare from a stranger by this title (orphans.py)
        $0 = "psgi-vassal $name (spare of $base->{pid}, warming)";
        my $worker = ForkServer::Spares::Worker->prefork($base->{app}, $self->{paths}, $name, $link,
                                                         $self->{warm_timeout});
        ForkServer::Spares::Rehearsal::vassal_start() for 1 .. ForkServer::Spares::Rehearsal::TIMES;
        $0 = "psgi-vassal $name (spare of $base->{pid})";
        syswrite($link, "R$$") or die "telling the base: $!\n";
        $warm = 1;
        my $req = _wait_for_adoption($link, $worker);
        close $link;
        # a vassal now: it stops as every vassal does
        ForkServer::Process::Session::die_with_parent(0) if $base->{clone};
        $SIG{TERM} = 'DEFAULT';
        $base->_become_vassal($req, first_worker => $worker->{gone} ? undef : $worker);    # does not return
        1;
    };
    # before it is warm, the base says why, in its one line for the failure
    if (!$ok && !($warm || !$link->opened || ForkServer::Link::send_fds($link, "E$$ " . substr($@, 0, 2000)))) {
        ForkServer::Log::line($name, "spare pid $$: $@");
    }
    leave($ok ? 0 : 1);
}

=head2 leave($status)

A spare that ends without an adoption (its base gone or replaced, its
worker gone, its warm-up failed) takes its session with it: its worker
and whatever the app started in the warm-up (ForkServer::Process::Session). The
Emperor leaves a spare's session alone: only the spare knows it is over.

=cut

sub leave {
    my ($status) = @_;
    $SIG{TERM} = 'IGNORE';
    ForkServer::Process::Session::end_others(leader_only => 1, grace => 1);
    POSIX::_exit($status);
}

# Blocks until the base hands over an adoption; exits quietly on end of file
# (the base is gone or let us go) or when the waiting worker is gone. An
# adoption the base has already answered with our pid is served even if the
# worker has just died: the vassal forks fresh workers.
# The base may have closed its end already (the adoption sent): no SIGPIPE.
sub tell_worker_gone {
    my ($link) = @_;
    local $SIG{PIPE} = 'IGNORE';
    syswrite($link, WORKER_GONE . $$);
    return;
}

sub _wait_for_adoption {
    my ($link, $worker) = @_;
    my $select = IO::Select->new($link, $worker->{link});
    my @ready;
    @ready = $select->can_read until @ready;    # empty: a signal the app handles
    if (grep { $_ == $worker->{link} } @ready) {
        $worker->discard;
        $worker->{gone} = 1;
        # The base replies with our pid before it sends the adoption: one not
        # here yet may be on its way. Only the base knows; it answers with
        # the adoption, or by closing the link once it has forgotten us.
        tell_worker_gone($link) unless grep { $_ == $link } @ready;
    }
    my ($data, @fds) = ForkServer::Link::recv_fds($link);
    leave(0) unless defined $data && @fds;    # the base forgot us, or is gone
    # no connection to the requester: the base sent the pid reply
    my $req = eval { ForkServer::Base::Request->handed_over(sock => undef, data => $data, fds => \@fds) };
    if (!$req) {
        POSIX::close($_) for @fds;
        die "the request from the base: $@";
    }
    return $req;
}

1;
