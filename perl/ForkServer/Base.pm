package ForkServer::Base;
use strict;
use warnings;

use Errno qw(EMFILE ENFILE);
use IO::Select ();
use IO::Socket::UNIX ();
use POSIX qw(WNOHANG);
use Socket qw(SOL_SOCKET SOCK_STREAM SO_PEERCRED SOMAXCONN);
use Time::HiRes ();
use ForkServer::Base::Clone ();
use ForkServer::Process::Exit ();
use ForkServer::Config ();
use ForkServer::Process::Descriptors ();
use ForkServer::Vassal::EmperorPipe ();
use ForkServer::Base::HugePages ();
use ForkServer::Vassal::Identity ();
use ForkServer::Log ();
use ForkServer::Base::Request ();
use ForkServer::Process::Random ();
use ForkServer::Base::Preloaded ();
use ForkServer::Protocol qw(MASK_ON_DEMAND SPAWNED STOP_NOW STOP);
use ForkServer::Process::Session ();
use ForkServer::Spares ();
use ForkServer::Process::Startup ();
use ForkServer::Vassal ();
use ForkServer::Base::Warmup ();

=head1 NAME

ForkServer::Base - the base vassal: preloaded code plus a fork server that adopts vassals

=head1 SYNOPSIS

  ForkServer::Base->new(
      config    => $config,    # ForkServer::Config with fork-server set
      app       => $app,       # the early-psgi app, already loaded
      emperor   => $pipe_fh,   # or undef
      config_fh => $fh,        # or undef
  )->run;                      # returns on byte 0/2 or end of file on the Emperor pipe, or SIGTERM/SIGINT

=head1 DESCRIPTION

Binds the C<fork-server> UNIX socket (mode C<fork-server-mode>, default
0600), sends byte 1 and serves adoption requests (PROTOCOL.md sections 2 to
4) from peers whose uid (SO_PEERCRED) is in C<fork-server-allow-uid>
(default: the uid the base runs as).

With C<early-warmup PATH> (repeatable), the base first calls the preloaded
app once per PATH (L<ForkServer::Base::Warmup>): a synthetic C<GET PATH>, the
response consumed, one log line per path with its status and time, or its
error (not fatal). Whatever state the app builds lazily on its first
request is then built once, in the base, and shared by every adopted
vassal, instead of being built again by the first request of every worker.

One loop multiplexes the listening socket, the Emperor pipe and every
client being read, so a slow client delays nobody; a client that has not
sent a whole request after C<fork-server-timeout> seconds is dropped. A
refused request closes every descriptor it brought and logs one line.

Out of descriptors (C<EMFILE>, C<ENFILE>), the base does not spin on its
listening socket, which stays readable while accept fails: it gives up a
spare descriptor kept for this, accepts and closes one waiting client (the
requester sees the connection closed without a pid), takes the spare back,
logs one line for the whole episode, and stops watching the socket for a
while (0.1 s, doubling up to 2 s while it lasts).

A complete request is served with one fork, C<clone(CLONE_PARENT)>
(L<ForkServer::Base::Clone>), when the requester is the base's own parent (the
Emperor): the vassal is born the Emperor's child, with no intermediate
process. Otherwise (another requester, not x86_64 Linux, a failed start-up
check, or C<fork-server-double-fork> set) it is served with uWSGI's double
fork, and the kernel hands the grandchild to the Emperor, a subreaper; the
base reaps the intermediate child without waiting for it.

Either way the vassal first becomes the leader of a new session
(L<ForkServer::Process::Session>: the Emperor tells its orphans by session id), then
closes everything of the base, sets
C<UWSGI_EMPEROR_FD> (and C<UWSGI_EMPEROR_FD_CONFIG>), puts the on-demand
socket on descriptor 0, replies with its pid, then configures itself from
the received argv alone and runs L<ForkServer::Vassal> on the preloaded app.

=cut

use constant MAX_PENDING => 64;    # clients being read at once; more are refused
use constant PAUSE_FIRST => 0.1;   # out of descriptors: the listening socket rests this long,
use constant PAUSE_MAX   => 2;     # doubling up to this

sub new {
    my ($class, %args) = @_;
    my $self = bless {
        %args,
        clients  => {},     # fileno => ForkServer::Base::Request
        children => 0,      # intermediate children not reaped yet
        pid      => $$,     # only this process may unlink the socket
        parent   => getppid(),    # the Emperor (spares born with clone are its children too)
    }, $class;
    $self->{name} = $self->{config}->name;
    my @allow = $self->{config}->list('fork-server-allow-uid');
    $self->{allow} = { map { $_ => 1 } (@allow ? @allow : $>) };
    return $self;
}

sub log { my ($self, $msg) = @_; ForkServer::Log::line($self->{name}, $msg) }

sub run {
    my ($self) = @_;
    ForkServer::Vassal->warm_up;
    $self->early_warmup;    # before huge_pages: what it builds is shared too
    $self->note_app_fds;
    my $pages = $self->huge_pages;
    my $how = $self->choose_fork;
    $self->listen;
    $0 = $self->{config}->get('procname') // "psgi-vassal $self->{name} (fork server)";
    my $spares = $self->start_spares;
    # logged before byte 1, so the line is there when the Emperor acts on it
    $self->log("fork server listening on $self->{path} ($how; $pages; $spares)");
    ForkServer::Vassal::EmperorPipe->send($self->{emperor}, SPAWNED);
    my $stop = sub { $self->{stop} = "signal $_[0]" };
    local $SIG{TERM} = $stop;
    local $SIG{INT}  = $stop;
    local $SIG{PIPE} = 'IGNORE';
    local $SIG{CHLD} = sub { };    # interrupts select, so children are reaped at once
    # the Emperor killed (-9): SIGTERM, as if it had stopped us; end of
    # file on its pipe says the same, when the base is back in its loop
    ForkServer::Process::Session::die_with_parent(POSIX::SIGTERM()) if $self->{emperor};
    $self->loop;
    $self->log("stopping ($self->{stop})");
    $self->shutdown;
    return;
}

# What the app holds open now (it opened them while preloaded or warming
# up, as the base's user): every adopted vassal closes them
# (ForkServer::Process::Descriptors), but those its `keep-fd` names. Said once.
sub note_app_fds {
    my ($self) = @_;
    my %ours = map { $_ => 1 } 0, 1, 2, grep { defined } map { $_ ? fileno $_ : undef } @$self{qw(emperor config_fh)};
    my %app = map { $_ => ForkServer::Process::Descriptors::describe($_) } grep { !$ours{$_} } ForkServer::Process::Descriptors::open_fds();
    $self->{app_fds} = \%app;
    return unless %app;
    $self->log("adopted vassals close the descriptors the app holds: "
        . join(', ', map { "$_ ($app{$_})" } sort { $a <=> $b } keys %app) . " (keep-fd keeps one)");
    return;
}

# Warm spare vassals (ForkServer::Spares): only under an Emperor, which
# reaps them; the pool fills from the loop, when no adoption waits.
sub start_spares {
    my ($self) = @_;
    my $k = $self->{config}->get('fork-server-spares') // 0;
    return 'spares: off (fork-server-spares = 0)' unless $k;
    return 'spares: off (no Emperor to reap them)' unless $self->{emperor};
    # what MAX_PENDING clients may hold at once (a connection and three
    # descriptors each), and a few for the loop itself
    $self->{spares} = ForkServer::Spares->new(base => $self, count => $k, fd_reserve => 4 * MAX_PENDING + 16);
    return "spares: $k";
}

# The app's own lazy state (templates, time zones, caches), built once here
# rather than by the first request of every worker of every vassal.
sub early_warmup {
    my ($self) = @_;
    my @paths = $self->{config}->list('early-warmup');
    return unless @paths;
    return $self->log("early-warmup ignored: no early-psgi app to call") unless $self->{app};
    ForkServer::Base::Warmup::run($self->{app}, \@paths, sub { $self->log($_[0]) });
    return;
}

# The preloaded memory in 2 MB pages: forks copy 512 times fewer page-table
# entries (ForkServer::Base::HugePages). Done last, once everything is loaded.
sub huge_pages {
    my ($self) = @_;
    return 'huge pages: off (fork-server-hugepages = false)' unless $self->{config}->get('fork-server-hugepages');
    my ($mb, $why) = ForkServer::Base::HugePages::collapse();
    return $mb ? "huge pages: $mb MB" : "huge pages: none ($why)";
}

# Clone when we can (see DESCRIPTION); decided once, before serving.
sub choose_fork {
    my ($self) = @_;
    $self->{clone} = 0;
    return 'double fork: fork-server-double-fork is set' if $self->{config}->get('fork-server-double-fork');
    my ($ok, $why) = ForkServer::Base::Clone::probe();
    return "double fork: clone unavailable: $why" unless $ok;
    $self->{clone} = 1;
    return "clone(CLONE_PARENT) for requests from pid " . getppid() . ", double fork for others";
}

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

sub loop {
    my ($self) = @_;
    my $select = $self->{select} = IO::Select->new($self->{listen});
    $select->add($self->{emperor}) if $self->{emperor};
    my $spares = $self->{spares};
    $spares->watch_with($select) if $spares;
    until ($self->{stop}) {
        # below any adoption being read: one spare per turn, none while a client waits
        $spares->make_one if $spares && !%{ $self->{clients} } && $spares->wants_one;
        my @ready = $select->can_read($self->_timeout);
        for my $fh (@ready) {
            if    ($fh == $self->{listen})                        { $self->accept_clients }
            elsif ($self->{emperor} && $fh == $self->{emperor})   { $self->emperor_says }
            elsif (my $req = $self->{clients}{ fileno $fh })      { $self->client_readable($req) }
            elsif ($spares && $spares->owns($fh))                 { $spares->readable($fh) }
            last if $self->{stop};
        }
        $self->expire_clients;
        $self->reap;
        $self->_resume_listening;
    }
    return;
}

sub _timeout {
    my ($self) = @_;
    my @deadlines = map { $_->deadline } values %{ $self->{clients} };
    push @deadlines, $self->{paused_until} if $self->{paused_until};
    push @deadlines, $self->{spares}->next_at if $self->{spares} && $self->{spares}->next_at;
    return undef unless @deadlines;
    my ($next) = sort { $a <=> $b } @deadlines;
    my $wait = $next - Time::HiRes::time();
    return $wait > 0 ? $wait : 0;
}

sub accept_clients {
    my ($self) = @_;
    my $accepted = 0;
    while (my $client = $self->{listen}->accept) {
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
        $client->blocking(0);
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
        if (my $client = $self->{listen}->accept) {
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

sub emperor_says {
    my ($self) = @_;
    my $n = sysread $self->{emperor}, my $byte, 1;
    return if !defined $n && ($!{EINTR} || $!{EAGAIN});
    if (!$n) {
        $self->{stop} = 'the Emperor is gone';
    }
    elsif (ord $byte == STOP_NOW || ord $byte == STOP) {
        $self->{stop} = 'byte ' . ord($byte) . ' from the Emperor';
    }
    else {
        $self->log("ignoring byte " . ord($byte) . " from the Emperor");
    }
    return;
}

sub reap {
    my ($self) = @_;
    while ($self->{children} > 0 && waitpid(-1, WNOHANG) > 0) {
        $self->{children}--;
    }
    return;
}

sub shutdown {
    my ($self) = @_;
    return unless $$ == $self->{pid};
    $_->close_all for values %{ $self->{clients} };
    $self->{clients} = {};
    $self->{spares}->close_links if $self->{spares};    # each waiting spare ends
    close $self->{listen};
    unlink $self->{path};
    # no Emperor left to sweep what the app started in the base's session
    if ($self->{emperor} && ($self->{stop} eq 'the Emperor is gone' || getppid() != $self->{parent})) {
        ForkServer::Process::Session::end_others(leader_only => 1, log => sub {
            $self->log("the Emperor is gone; stopping $_[0] process(es) left in the base's session");
        });
    }
    return;
}

sub adopt {
    my ($self, $req) = @_;
    if (my $spares = $self->{spares}) {
        $spares->hold_off;
        if ($spares->take($req)) {
            $req->close_all;    # the spare holds them now
            return;
        }
    }
    # Only our parent gets its vassal as a direct child: anyone else asking
    # (a helper process of the Emperor, a test) gets the protocol's double
    # fork and the reparenting to the nearest subreaper.
    if ($self->{clone} && ($req->peer_pid // 0) == getppid()) {
        my $pid = ForkServer::Base::Clone::clone_parent();
        return $self->refuse($req, "clone: $!") unless defined $pid;
        $self->_become_vassal($req) if $pid == 0;    # does not return
        $req->close_all;    # the vassal holds them now
        return;
    }
    my $pid = fork;
    return $self->refuse($req, "fork: $!") unless defined $pid;
    if ($pid == 0) {
        $self->_intermediate_child($req);    # does not return
    }
    $self->{children}++;
    $req->close_all;    # the child holds them now
    return;
}

# The first child forks the vassal and exits at once: it does nothing else,
# because every page it touched would be copied for nothing (the vassal has
# to do the same work anyway, while this child's exit runs on the other core).
sub _intermediate_child {
    my ($self, $req) = @_;
    my $pid = fork;
    POSIX::_exit(defined $pid ? 0 : 1) unless defined $pid && $pid == 0;
    $self->_become_vassal($req);
}

# In a process forked from the base: let go of everything of the base's
# (a spare calls this at birth, a vassal again at adoption: idempotent).
sub _close_base {
    my ($self) = @_;
    $SIG{$_} = 'DEFAULT' for qw(TERM INT PIPE CHLD);
    close delete $self->{listen} if $self->{listen};
    close delete $self->{spare}  if $self->{spare};
    $_->close_all for values %{ $self->{clients} };
    $self->{clients} = {};
    close delete $self->{emperor}   if $self->{emperor};
    close delete $self->{config_fh} if $self->{config_fh};
    # the spares' links: a waiting spare must see end of file when the base goes
    (delete $self->{spares})->close_links if $self->{spares};
    return;
}

# Lose everything of the base and arrange the descriptors as the protocol
# says (PROTOCOL.md section 4, step 3).
sub _detach_from_base {
    my ($self, $req) = @_;
    $self->_close_base;
    my ($pipe_fd, $config_fd, $ondemand_fd) = $req->fds_by_role;
    $ENV{UWSGI_EMPEROR_FD} = $pipe_fd;
    if (defined $config_fd) { $ENV{UWSGI_EMPEROR_FD_CONFIG} = $config_fd }
    else                    { delete $ENV{UWSGI_EMPEROR_FD_CONFIG} }
    if (defined $ondemand_fd) {
        POSIX::dup2($ondemand_fd, 0) // die "dup2 of the on-demand socket to descriptor 0: $!\n";
        POSIX::close($ondemand_fd);
    }
    $req->release_fds;
    return;
}

# The grandchild: reply with its pid, then become the vassal the argv asks
# for. Its options replace the base's; the preloaded app stays in memory.
sub _become_vassal {
    my ($self, $req, %vassal) = @_;    # %vassal: first_worker (a spare's, ForkServer::Spares)
    my (undef, @argv) = $req->argv;
    my $config_text;
    ForkServer::Process::Startup::run(
        argv    => \@argv,
        session => 1,
        prepare => sub { ForkServer::Process::Random::reseed(); $self->_detach_from_base($req); $self->_reply_pid($req) },
        # `emperor prove`: another kind of adopted vassal, a test file; its
        # pipes are the test's stdout and stderr (ForkServer::Prove::TestFile).
        before_config => sub {
            my ($text, %pipes) = @_;
            $config_text = $text;    # a spare's first worker configures itself from it too
            return unless ($argv[0] // '') eq '--test-file';
            die "this base does not run test files\n" unless ForkServer::Prove::TestFile->can('become_test');
            ForkServer::Prove::TestFile::become_test(
                argv => \@argv, config_text => $text, stdout => $pipes{emperor}, stderr => $pipes{config_fh},
            );    # returns only on error
        },
        run => sub {
            my (%common) = @_;
            die "fork-server is set: an adopted vassal cannot be a base vassal\n"
                if defined $common{config}->get('fork-server');
            $self->_close_inherited($common{config}, $vassal{first_worker},
                                    grep { defined } @common{qw(emperor config_fh)});
            $vassal{first_worker}->for_request(\@argv, $config_text) if $vassal{first_worker};
            # its workers too: they are forked after this
            ForkServer::Process::Exit::without_global_destruction();
            ForkServer::Log::line($common{config}->name, $_) for ForkServer::Base::Preloaded::warnings();
            ForkServer::Vassal->new(
                %common,
                preloaded_app => $self->{app},
                use_fd0       => ($req->mask & MASK_ON_DEMAND) ? 1 : 0,
                %vassal,
            )->run;
        },
        # A plain exit: the app's END blocks run and what the vassal holds
        # is freed and flushed, but not the whole heap inherited from the
        # base (ForkServer::Process::Exit: each stopping vassal would copy the
        # codebase's pages, 50 MB for the heavy benchmark app, times the
        # fleet on a shutdown).
        # A spare's warm worker that was never given the socket (the vassal
        # failed first) goes with it rather than outliving it as an orphan.
        exit => sub { $vassal{first_worker}->discard if $vassal{first_worker}; exit $_[0] },
    );
}

# Before the app runs in the vassal: nothing of the base's but stdio, its
# own pipes, what a spare's first worker needs, and the `keep-fd` ones.
sub _close_inherited {
    my ($self, $config, $worker, @pipes) = @_;
    my @keep = map { $self->_may_keep($config, $_) } $config->list('keep-fd');
    ForkServer::Process::Descriptors::close_all_but(0, 1, 2, (map { fileno $_ } @pipes),
                                           ($worker ? $worker->fds : ()), @keep);
    return;
}

# keep-fd N: one of the app's (note_app_fds), and, for a vassal that drops
# root for a uid, only a descriptor whose file that uid owns (anything else
# was opened with root's rights: its permission check is not made again).
sub _may_keep {
    my ($self, $config, $fd) = @_;
    my $what = $self->{app_fds}{$fd}
        // die "keep-fd $fd: not a descriptor the base's app holds ("
             . (join(', ', sort { $a <=> $b } keys %{ $self->{app_fds} || {} }) || 'it holds none') . ")\n";
    my $id = ForkServer::Vassal::Identity::target($config);
    if ($id && $> == 0 && $id->{uid} != 0) {
        my @st = POSIX::fstat($fd);
        my $owner = @st ? $st[4] : '?';
        die "keep-fd $fd ($what): refused for uid $id->{uid}: the base opened it as root"
            . " and it belongs to uid $owner, not to uid $id->{uid}\n"
            if $owner ne $id->{uid};
    }
    return $fd;
}

sub _reply_pid {
    my ($self, $req) = @_;
    # for the rest of the vassal's life, as before it was an eval's local
    $SIG{PIPE} = 'IGNORE';
    $req->reply_pid($$) if $req->sock;    # a spare's was sent by the base (ForkServer::Spares)
    $req->close_all;
    return;
}

1;
