package ForkServer::Spares;
use strict;
use warnings;

use IO::Select ();
use POSIX ();
use Socket qw(AF_UNIX SOCK_SEQPACKET PF_UNSPEC);
use Time::HiRes ();
use ForkServer::Base::Clone ();
use ForkServer::Link ();
use ForkServer::Log ();
use ForkServer::Protocol qw(encode_packet encode_array MODIFIER1_FORK_SERVER);
use ForkServer::Base::Request ();
use ForkServer::Spares::Rehearsal ();
use ForkServer::Spares::Process ();
use ForkServer::Spares::Solo ();
use ForkServer::Spares::WorkerStart ();

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

The spare's own life, from its birth to its adoption or its end, is
L<ForkServer::Spares::Process>: the base sends the requester the pid reply
with the spare's pid itself, then hands the spare the adoption packet with
the request's descriptors in one message on the link (L<ForkServer::Link>).

The base hands over only requests whose argv has no C<--psgi> and is not a
test file (C<emperor prove>); the others, and every request while no spare
is ready, are served with the fork as before. Spares are made one at a time,
only when no adoption is being read, and not before 0.1 s after the last
adoption (by a spare or a fork: L</hold_off()>): refilling never delays an
adoption, a burst of them, nor the start of the vassals just adopted.

A spare that dies is noticed by the base (end of file on its side) and
replaced.

A spare that cannot warm up (its worker dies in the app's warm-up, or is
still warming after C<fork-server-spare-timeout> seconds and is killed)
tells the base why (C<E PID WHY>); the base logs one line and makes the
next spare 1 s later, then twice as late each time up to C<BACKOFF_MAX>,
until one is warm: an app whose warm-up exits or hangs in a forked process
costs one process at a time, not a fork loop. The pool stops short of
C<count> where the base's descriptor limit would leave fewer than
C<fd_reserve> descriptors for adoptions (one line). A waiting spare whose
worker died says C<G PID>: the base forgets it (end of file on the link)
unless it has already given its pid.

=cut

use constant RETRY_AFTER  => 1;      # seconds before another try after a spare could not be made
use constant BACKOFF_MAX  => 60;     # a spare that cannot warm up: the wait before the next one doubles up to this
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
        if ($pid == 0) { close $ours; $self->_become_spare($theirs) }
    }
    else {
        $pid = fork;
        return $self->_failed("fork: $!") unless defined $pid;
        if ($pid == 0) {
            my $spare = fork;
            POSIX::_exit(defined $spare ? 0 : 1) unless defined $spare && $spare == 0;
            close $ours;
            $self->_become_spare($theirs);
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
    my ($msg, @fds) = ForkServer::Link::recv_fds_now($fh);
    return if !defined $msg && ($!{EINTR} || $!{EAGAIN});
    my $n = defined $msg ? length $msg : $! ? undef : 0;
    if ($n && $msg =~ /\AR(\d+)\z/) {
        @$s{qw(ready pid)} = (1, $1);
        # its warm worker's own link: the adoption goes to the worker too
        # (take), which starts without waiting for its master
        $s->{worker_link} = _handle(shift @fds);
        POSIX::close($_) for @fds;
        delete $self->{backoff};
        $self->log("spares: $self->{count} ready") if $self->ready == $self->{count};
        return;
    }
    POSIX::close($_) for @fds;
    my $why = $n && $msg =~ /\AE(\d+) (.*)\z/s ? do { $s->{pid} //= $1; $2 } : undef;
    $self->_forget($s);
    _close_links($s);    # the spare waits for this (end of file) to leave
    my $pid = $s->{pid} // '?';
    return $self->log("spare pid $pid lost its worker before it was adopted")
        if $s->{ready} && $n && $msg =~ /\A${\ForkServer::Spares::Process::WORKER_GONE}\d+\z/;
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

sub _handle {
    my ($fd) = @_;
    return undef unless defined $fd;
    open(my $fh, '+<&=', $fd) or do { POSIX::close($fd); return undef };
    return $fh;
}

sub _close_links {
    my ($s) = @_;
    close $s->{link};
    close delete $s->{worker_link} if $s->{worker_link};
    return;
}

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
hands its warm worker the packet and the request's descriptors, sends the
pid reply itself (the requester does not wait for the spare to wake up),
then hands the spare the same. A requester gone before the reply is the
vassal's to see, as for a clone.
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
    $self->_forget($s);
    # a spare is born already: the cgroup's directory is not its to hold
    my ($mask, @fds) = $req->without_cgroup;
    my $packet = encode_packet(MODIFIER1_FORK_SERVER, $mask, encode_array($req->argv));
    # The warm worker first, straight from here, even before the pid reply:
    # it sets itself up as its vassal's worker and accepts on the vassal's
    # socket (on the other core) while this base replies and its master
    # sets itself up (ForkServer::Spares::Worker). The spare learns from the
    # leading D that its worker was sent the request too. A worker gone
    # meanwhile: the spare gives it the request as before.
    # A vassal that may be `master = false` has no worker: the warm worker
    # may be the vassal itself (its warm-up is what the first request
    # needs). It is given the requester too and replies with the pid of
    # the process that serves, its own or its spare's (leading O for the
    # spare: ForkServer::Spares::WorkerStart).
    my $owned = $s->{worker_link} && ForkServer::Spares::Solo::may_be_solo($req);
    my $direct = $s->{worker_link}
        && ForkServer::Link::send_fds($s->{worker_link}, ($owned ? ForkServer::Spares::WorkerStart::REPLY_IS_YOURS : '')
                                      . $packet, @fds, ($owned ? fileno $req->sock : ()));
    $owned &&= $direct;
    # As for a clone (ForkServer::Base::Adoption): a requester gone already
    # is the vassal's to see, end of file on its Emperor pipe.
    eval { $req->reply_pid($s->{pid}); 1 } or $self->log("vassal pid $s->{pid}: $@") unless $owned;
    # Rare (the spare died after _notice_ends): it ends on end of file, and
    # the Emperor, which has its pid, sees its vassal die and starts it again.
    my $lead = $owned ? ForkServer::Spares::Process::WORKER_REPLIES : $direct ? ForkServer::Spares::Process::DIRECT : '';
    ForkServer::Link::send_fds($s->{link}, $lead . $packet, @fds)
        or $self->log("spare pid $s->{pid} could not be given its request ($!): it ends");
    _close_links($s);    # it is no spare of ours any more
    return 1;
}

# The base loaded more code (ForkServer::Base::Learned): the spares forked
# before it end (end of file on their links); the pool refills, as after adoptions.
sub renew {
    my ($self) = @_;
    for my $s (values %{ $self->{spares} }) {
        $self->_forget($s);
        _close_links($s);
    }
    return;
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

# In the new process: a spare from now on (ForkServer::Spares::Process).
sub _become_spare {
    my ($self, $link) = @_;
    ForkServer::Spares::Process::run(base => $self->{base}, link => $link, paths => $self->{paths},
                                     warm_timeout => $self->{warm_timeout});    # does not return
}

sub close_links {
    my ($self) = @_;
    _close_links($_) for values %{ $self->{spares} };
    $self->{spares} = {};
    return;
}

1;
