package ForkServer::Base;
use strict;
use warnings;

use IO::Select ();
use POSIX qw(WNOHANG);
use Time::HiRes ();
use ForkServer::Base::Clone ();
use ForkServer::Config ();
use ForkServer::Process::Descriptors ();
use ForkServer::Vassal::EmperorPipe ();
use ForkServer::Base::HugePages ();
use ForkServer::Base::Priority ();
use ForkServer::Log ();
use ForkServer::Protocol qw(SPAWNED STOP_NOW STOP);
use ForkServer::Process::Session ();
# The web vassal's own modules (ForkServer::Vassal, its HTTP server, the
# spares, the warm-up) are required where used: the web base's entry
# (ForkServer::run_base) loads them before the fork server exists, so that
# every vassal shares them; a base for test files needs none of them, and
# starts a third sooner without (ForkServer::Prove::TestFile).
# its parts, one job each: the socket and the requests being read; the adoption
use parent qw(ForkServer::Base::Clients ForkServer::Base::Adoption);

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

Reading requests, and the fork-server socket: L<ForkServer::Base::Clients>
(a refused request closes every descriptor it brought and logs one line).
Serving a complete one (a warm spare, C<clone(CLONE_PARENT)> or the double
fork, then the vassal's start): L<ForkServer::Base::Adoption>. Warm spares:
L<ForkServer::Spares>.

=cut

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
    ForkServer::Vassal->warm_up if ForkServer::Vassal->can('warm_up');
    $self->early_warmup;    # before huge_pages: what it builds is shared too
    $self->note_app_fds;
    # before huge_pages: the probe's test child shares the base's memory
    # while it lives, and every huge page the base writes meanwhile is split
    # back into 4 KB pages for good (a fourth of the heap: a page table more
    # for every fork to copy)
    my $how = $self->choose_fork;
    my $pages = $self->huge_pages;
    # after the start-up: only serving runs ahead of the vassals
    my $priority = ForkServer::Base::Priority::raise($self->{config}->get('fork-server-priority') // 0);
    $self->listen;
    $0 = $self->{config}->get('procname') // "psgi-vassal $self->{name} (fork server)";
    my $learned = $self->start_learning;    # before the first fork: every vassal and spare knows where to report
    my $spares = $self->start_spares;
    # logged before byte 1, so the line is there when the Emperor acts on it
    $self->log("fork server listening on $self->{path} ($how; $pages; $priority; $spares; $learned)");
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

# What the vassals' processes `require` after the fork (an app's lazy
# loads), loaded here between adoptions (ForkServer::Base::Learned): only
# for web vassals, whose app is the base's.
sub start_learning {
    my ($self) = @_;
    return 'preload-learned: off' unless $self->{config}->get('preload-learned');
    return "preload-learned: off (not a web base)" unless do { no warnings "once"; $ForkServer::WEB_VASSALS };
    require ForkServer::Base::Learned;
    my $learned = eval { ForkServer::Base::Learned->new(log => sub { $self->log($_[0]) }, forked => sub { $self->{children}++ }) };
    return "preload-learned: off ($@)" =~ s/\n\)\z/)/r unless $learned;
    $self->{learned} = $learned;
    return 'preload-learned: on';
}

# A turn of loading what the vassals reported, when no adoption is being
# read or has come for a while (ForkServer::Base::Learned::QUIET); it ends
# early when a client connects or the Emperor writes.
sub load_learned {
    my ($self) = @_;
    my $learned = $self->{learned};
    my @watch = grep { defined } $self->{listen}, $self->{emperor};
    my $waiting = IO::Select->new(@watch);
    my $batch = $learned->work(
        until => Time::HiRes::time() + ForkServer::Base::Learned::TURN(),
        stop  => sub { $waiting->can_read(0) },
    );
    # spares forked before it lack it: they make way for new ones
    $self->{spares}->renew if $batch && $self->{spares};
    return;
}

sub _learning_due {
    my ($self) = @_;
    my $learned = $self->{learned} or return 0;
    return 0 unless $learned->pending && !%{ $self->{clients} };
    return Time::HiRes::time() >= ($self->{adopted_at} // 0) + ForkServer::Base::Learned::QUIET();
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
    require ForkServer::Spares;
    $self->{spares} = ForkServer::Spares->new(base => $self, count => $k,
                                              fd_reserve => 4 * ForkServer::Base::Clients::MAX_PENDING + 16);
    return "spares: $k";
}

# The app's own lazy state (templates, time zones, caches), built once here
# rather than by the first request of every worker of every vassal.
sub early_warmup {
    my ($self) = @_;
    my @paths = $self->{config}->list('early-warmup');
    return unless @paths;
    return $self->log("early-warmup ignored: no early-psgi app to call") unless $self->{app};
    require ForkServer::Base::Warmup;
    ForkServer::Base::Warmup::run($self->{app}, \@paths, sub { $self->log($_[0]) });
    return;
}

# The preloaded memory in 2 MB pages: forks copy 512 times fewer page-table
# entries (ForkServer::Base::HugePages). Done last, once everything is loaded.
sub huge_pages {
    my ($self) = @_;
    return 'huge pages: off (fork-server-hugepages = false)' unless $self->{config}->get('fork-server-hugepages');
    my ($mb, $why) = ForkServer::Base::HugePages::collapse();
    my $settled = ForkServer::Base::HugePages::settle();
    $settled = $settled ? ", $settled" : '';
    return $mb ? "huge pages: $mb MB$settled" : "huge pages: none ($why)$settled";
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

sub loop {
    my ($self) = @_;
    my $select = $self->{select} = IO::Select->new($self->{listen});
    $select->add($self->{emperor}) if $self->{emperor};
    my $spares = $self->{spares};
    $spares->watch_with($select) if $spares;
    my $learned = $self->{learned};
    $select->add($learned->sock) if $learned;
    until ($self->{stop}) {
        # below any adoption being read: what the vassals loaded lazily, then
        # one spare per turn, none while a client waits
        $self->load_learned if $self->_learning_due;
        if ($learned && (my $trial = $learned->trial_fh)) { $select->add($trial) unless $select->exists($trial) }
        $spares->make_one if $spares && !%{ $self->{clients} } && $spares->wants_one;
        my @ready = $select->can_read($self->_timeout);
        for my $fh (@ready) {
            if    ($fh == $self->{listen})                        { $self->accept_clients }
            elsif ($self->{emperor} && $fh == $self->{emperor})   { $self->emperor_says }
            elsif (my $req = $self->{clients}{ fileno $fh })      { $self->client_readable($req) }
            elsif ($spares && $spares->owns($fh))                 { $spares->readable($fh) }
            elsif ($learned && $fh == $learned->sock)             { $learned->readable }
            elsif ($learned && $learned->trial_fh && $fh == $learned->trial_fh) {
                $select->remove($fh);    # read to its end, or until it would block: added again next turn if still running
                $learned->trial_readable;
            }
            last if $self->{stop};
        }
        $self->expire_clients;
        $self->reap;
        $learned->check_trial if $learned;
        $self->_resume_listening;
    }
    return;
}

sub _timeout {
    my ($self) = @_;
    my @deadlines = map { $_->deadline } values %{ $self->{clients} };
    push @deadlines, $self->{paused_until} if $self->{paused_until};
    push @deadlines, $self->{spares}->next_at if $self->{spares} && $self->{spares}->next_at;
    if (my $learned = $self->{learned}) {
        push @deadlines, ($self->{adopted_at} // 0) + ForkServer::Base::Learned::QUIET()
            if $learned->pending && !%{ $self->{clients} };
        push @deadlines, $learned->trial_deadline if $learned->trial_deadline;
    }
    return undef unless @deadlines;
    my ($next) = sort { $a <=> $b } @deadlines;
    my $wait = $next - Time::HiRes::time();
    return $wait > 0 ? $wait : 0;
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
    while ($self->{children} > 0 && (my $pid = waitpid(-1, WNOHANG)) > 0) {
        $self->{children}--;
        $self->{learned}->reaped($pid) if $self->{learned};
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

1;
