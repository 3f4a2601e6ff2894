package ForkServer::Base::Learned;
use strict;
use warnings;

use IO::Handle ();
use POSIX ();
use Socket qw(AF_UNIX SOCK_DGRAM SOL_SOCKET MSG_DONTWAIT pack_sockaddr_un);
use Socket::MsgHdr ();
use Time::HiRes ();
use ForkServer::Base::LoadTrial ();

=head1 NAME

ForkServer::Base::Learned - the base loads what its vassals' processes C<require>d after the fork

=head1 SYNOPSIS

  # in the base, before its first fork (preload-learned = true):
  my $learned = ForkServer::Base::Learned->new(log => sub { $base->log($_[0]) });
  $select->add($learned->sock);
  $learned->readable;                        # its socket is readable: reports read, checked, queued
  $learned->work(until => $t, stop => sub { $request_waiting })    # an idle turn
      if $learned->pending;                  # true: a batch loaded
  $learned->trial_readable;                  # $learned->trial_fh is readable
  $learned->check_trial;                     # each turn: a trial past its time is killed
  $learned->reaped($pid);                    # the base reaped a child
  # in a vassal's worker, after each response (ForkServer::HTTPServer):
  ForkServer::Base::Learned::report();    # what %INC gained, if anything

=head1 DESCRIPTION

An app often C<require>s modules on first use (a template engine its
parser and grammar, a serializer its backend): every worker of every
adopted vassal then loads them again after the fork, with the page faults
of writing them into a process that shares the base's memory. This module
lets the base learn them: after a response, a vassal's worker whose
C<%INC> grew sends the base the modules the base did not have when it
forked it; the base, when idle, loads them itself, and the vassals adopted
after that have them preloaded.

What the base accepts, and only that: reports sent by a process running
as the base's own uid (the kernel's C<SCM_CREDENTIALS> on a datagram
socket in the abstract namespace: any local process finds its name in
F</proc/net/unix>, the sender's uid that the kernel writes is the check);
C<%INC> keys of a package name (C<Foo/Bar.pm>, words only), at most
C<MAX_MODULES> a report; files that the base finds itself, in the absolute
directories of its own C<@INC> (never C<.>, never a relative directory),
the very file the vassal loaded (one found elsewhere is not followed).

Each module is first tried in a process forked from the base (a trial,
L</work>): one that dies as it loads, ends the process, changes the
process's state (L<ForkServer::Base::LoadTrial> says what it looks at) or
takes more than 5 s, is not loaded in the base (one line, never tried again), and the vassals keep
loading it themselves. The others the base loads with its own C<@INC>,
only between adoptions (never while a request is being read, and not
before C<QUIET> seconds after the last adoption), in turns of at most
C<TURN> seconds that end early when a client connects or the Emperor
writes. A module that dies in the base all the same is removed from
C<%INC>, logged in one line and never tried again. Each batch is one line:
C<loaded N modules its vassals loaded lazily: ...>.

=cut

use constant MAX_REPORT  => 65000;    # bytes of one report
use constant MAX_MODULES => 1000;     # modules of one report
use constant MAX_KEY     => 255;      # bytes of one %INC key
use constant QUIET       => 0.1;      # seconds after the last adoption before loading
use constant TURN        => 0.05;     # seconds of loading per idle turn, at most (the module under way finishes)
use constant TRIAL_TIMEOUT => 60;     # seconds a trial process may take
use constant SCM_CREDENTIALS => 2;    # Linux; Socket.pm exports it only in recent versions
use constant SO_PASSCRED     => 16;

# Set in the base before its first fork, read by every process forked from
# it: where to report, and what the base had (or will never load).
our $ADDRESS;         # packed sockaddr_un; undef: no learning
our $BASE_UID;
our %KNOWN;           # %INC key => 1
our $KNOWN_COUNT = 0; # keys %INC when %KNOWN was taken

my $KEY_RE = qr{\A[A-Za-z_][A-Za-z0-9_]*(?:/[A-Za-z_][A-Za-z0-9_]*)*\.pm\z};

sub new {
    my ($class, %args) = @_;
    socket(my $sock, AF_UNIX, SOCK_DGRAM, 0) or die "learned modules: socket: $!\n";
    my $name = sprintf "\0psgi-forkserver-learn-%d-%08x%08x", $$, int rand 2**32, int rand 2**32;
    my $addr = pack_sockaddr_un($name);
    bind($sock, $addr) or die "learned modules: bind: $!\n";
    setsockopt($sock, SOL_SOCKET, SO_PASSCRED, 1) or die "learned modules: SO_PASSCRED: $!\n";
    IO::Handle::blocking($sock, 0);
    my $self = bless {
        log     => $args{log} // sub { },
        forked  => $args{forked} // sub { },    # a trial process was forked: the base reaps it
        sock    => $sock,
        queue   => [],        # [key, module] in the order reported
        queued  => {},
        trusted => [],        # loaded by a trial: to load here
        loaded  => [],        # this batch's, for its log line
        hdr     => Socket::MsgHdr->new(buflen => MAX_REPORT + 1, controllen => 64),
    }, $class;
    $ADDRESS  = $addr;
    $BASE_UID = $>;
    _take_known();
    return $self;
}

sub sock    { $_[0]{sock} }

# What every process forked from now on starts with.
sub _take_known {
    $KNOWN{$_} = 1 for keys %INC;
    $KNOWN_COUNT = keys %INC;
    return;
}

=head2 report()

In a process forked from the base (a vassal's worker, after each
response): sends the base the C<%INC> keys it did not have, with the files
they came from, if there are new ones since the last report. When there
are none, a compare of C<%INC>'s size; nothing either when this process
does not run as the base's uid, or when the base does not learn. Never
blocks; a report that cannot be sent is dropped.

=cut

sub report {
    return if keys %INC == $KNOWN_COUNT || !defined $ADDRESS;
    $KNOWN_COUNT = keys %INC;
    return unless $> == $BASE_UID && $< == $BASE_UID;
    my $body = '';
    my $count = 0;
    for my $key (sort keys %INC) {
        next if $KNOWN{$key};
        $KNOWN{$key} = 1;    # this process's copy: reported once
        next if $key !~ $KEY_RE;
        my $path = $INC{$key};
        next unless defined $path && !ref $path && $path =~ m{\A/[^\n\t]*\z};
        my $line = "$key\t$path\n";
        last if length($body) + length($line) > MAX_REPORT || ++$count > MAX_MODULES;
        $body .= $line;
    }
    return unless length $body;
    socket(my $sock, AF_UNIX, SOCK_DGRAM, 0) or return;
    send($sock, $body, MSG_DONTWAIT, $ADDRESS);
    close $sock;
    return;
}

=head2 readable()

Reads every report waiting (none blocks), keeps those of the base's uid,
and queues the modules that pass the checks above.

=cut

sub readable {
    my ($self) = @_;
    my $hdr = $self->{hdr};
    for (1 .. 64) {
        $hdr->buflen(MAX_REPORT + 1);
        $hdr->controllen(64);
        $hdr->flags(0);
        my $n = Socket::MsgHdr::recvmsg($self->{sock}, $hdr, MSG_DONTWAIT);
        last unless defined $n;
        my ($pid, $uid);
        my @cmsg = $hdr->cmsghdr;
        while (my ($level, $type, $data) = splice @cmsg, 0, 3) {
            ($pid, $uid) = unpack 'i I', $data if $level == SOL_SOCKET && $type == SCM_CREDENTIALS;
        }
        next unless defined $uid && $uid == $>;    # a tenant's (or a stranger's) report is not read
        next if $n > MAX_REPORT;
        $self->_take($hdr->buf);
    }
    return;
}

sub _take {
    my ($self, $body) = @_;
    my $count = 0;
    for my $line (split /\n/, $body) {
        last if ++$count > MAX_MODULES;
        my ($key, $path) = split /\t/, $line, 2;
        next unless defined $path && length $key <= MAX_KEY && $key =~ $KEY_RE;
        next if $KNOWN{$key} || $INC{$key} || $self->{queued}{$key};
        my $mine = _resolve($key);
        # not ours to load: found nowhere in our @INC, or elsewhere than the
        # vassal found it. Asked again by the next vassal: said once.
        $KNOWN{$key} = 1;
        next unless defined $mine && $mine eq $path;
        delete $KNOWN{$key};
        $self->{queued}{$key} = 1;
        push @{ $self->{queue} }, $key;
    }
    return;
}

# The file `require` would load for $key, looking only in the absolute
# directories of @INC.
sub _resolve {
    my ($key) = @_;
    for my $dir (@INC) {
        next if ref $dir || !defined $dir || $dir !~ m{\A/};
        my $file = "$dir/$key";
        return $file if -f $file;
    }
    return undef;
}

=head2 pending() -> bool

Whether there is work for an idle turn: modules to try, or modules tried
to load (none while a trial runs).

=cut

sub pending {
    my ($self) = @_;
    return 0 if $self->{trial};
    return @{ $self->{queue} } || @{ $self->{trusted} } ? 1 : 0;
}

=head2 work(until => $time, stop => $code) -> bool

An idle turn. Modules reported and not tried yet go to a trial: a process
forked from the base C<require>s them, one by one, and says for each
whether it loaded, died, changed the process's state as it loaded
(L<ForkServer::Base::LoadTrial>) or took too long; it ends at once
(C<POSIX::_exit>). A module that dies, changes that state, ends the trial
(an C<exit> at load) or makes it run past C<TRIAL_TIMEOUT> is not loaded
in the base: one line, and never tried again; its vassals keep loading it
themselves. Modules the trial loaded are loaded in the base, one by one,
until C<$time> is past or C<$code> returns true (a client is waiting).
Returns true when a batch was loaded and logged: what the base has now is
what the processes it forks from now on have.

=cut

sub work {
    my ($self, %args) = @_;
    return 0 if $self->{trial};
    return $self->_start_trial unless @{ $self->{trusted} };
    my $t = $self->{trusted};
    while (@$t) {
        my $key = shift @$t;
        $self->_load($key) unless $INC{$key};    # another module of the batch loaded it
        last if Time::HiRes::time() >= $args{until} || ($args{stop} && $args{stop}->());
    }
    return 0 if @$t;
    _take_known();
    my @loaded = @{ $self->{loaded} };
    $self->{loaded} = [];
    return 0 unless @loaded;
    $self->{log}->("loaded " . @loaded . " module" . (@loaded == 1 ? '' : 's') . " its vassals loaded lazily: "
        . join(', ', map { _module($_) } @loaded));
    return 1;
}

sub _module { (my $m = $_[0]) =~ s{/}{::}g; $m =~ s/\.pm\z//; $m }

sub _start_trial {
    my ($self) = @_;
    my @keys = splice @{ $self->{queue} };
    delete @{ $self->{queued} }{@keys};
    return 0 unless @keys;
    pipe(my $r, my $w) or do { $self->_give_up(\@keys, "pipe: $!"); return 0 };
    my $parent = $$;
    my $pid = fork;
    if (!defined $pid) {
        $self->_give_up(\@keys, "fork: $!");
        return 0;
    }
    if ($pid == 0) {
        close $r;
        ForkServer::Base::LoadTrial::run($w, $parent, @keys);    # does not return
    }
    close $w;
    IO::Handle::blocking($r, 0);
    $self->{forked}->();
    $self->{trial} = { pid => $pid, fh => $r, keys => \@keys, buf => '',
                       deadline => Time::HiRes::time() + TRIAL_TIMEOUT };
    return 0;
}

# Every module of the list set aside for good.
sub _give_up {
    my ($self, $keys, $why) = @_;
    $KNOWN{$_} = 1 for @$keys;
    $self->{log}->("could not try " . join(', ', map { _module($_) } @$keys) . " (not tried again): $why");
    return;
}

=head2 trial_fh() -> $fh or undef; trial_readable(); trial_deadline() -> $time or undef; reaped($pid)

The running trial's pipe, for the base's loop; what it said read (and the
trial judged once it said all, ended or is late); when it is late; and the
base's reaping of its pid (never signalled after that).

=cut

sub trial_fh       { $_[0]{trial} ? $_[0]{trial}{fh} : undef }
sub trial_deadline { $_[0]{trial} ? $_[0]{trial}{deadline} : undef }

sub reaped {
    my ($self, $pid) = @_;
    $self->{trial}{reaped} = 1 if $self->{trial} && $self->{trial}{pid} == $pid;
    return;
}

sub trial_readable {
    my ($self) = @_;
    my $t = $self->{trial} or return;
    while (1) {
        my $n = sysread $t->{fh}, my $chunk, 65536;
        if (!defined $n) {
            return if $!{EAGAIN} || $!{EINTR};
            return $self->_end_trial("reading its pipe: $!");
        }
        return $self->_end_trial('it ended') if $n == 0;
        $t->{buf} .= $chunk;
        while ($t->{buf} =~ s/\A([^\n]*)\n//) {
            my $line = $1;
            if    ($line eq 'D')                           { return $self->_end_trial(undef) }
            elsif ($line =~ /\AT (\S+)\z/)                { $t->{current} = $1 }
            elsif ($line =~ /\AK (\S+)\z/)                { push @{ $t->{ok} }, $1; delete $t->{current} }
            elsif ($line =~ /\A([FS]) (\S+)\t(.*)\z/)     { $self->_refuse($2, $1 eq 'F' ? "it died: $3" : "as it loads: $3"); delete $t->{current} }
        }
    }
}

# The loop's check: a trial past its time is killed (its module blamed).
sub check_trial {
    my ($self) = @_;
    my $t = $self->{trial} or return;
    return if Time::HiRes::time() < $t->{deadline};
    kill 'KILL', $t->{pid} unless $t->{reaped};
    $self->_end_trial("it ran past " . TRIAL_TIMEOUT . " s");
    return;
}

sub _end_trial {
    my ($self, $why) = @_;
    my $t = delete $self->{trial};
    close $t->{fh};
    # ended early: the module under way is blamed, those after it wait for the next trial
    if (defined $why) {
        my %done = map { $_ => 1 } @{ $t->{ok} || [] }, @{ $t->{refused} || [] };
        my $blamed = $t->{current};
        $self->_refuse($blamed, "the trial process loading it stopped: $why") if defined $blamed;
        my @rest = grep { !$done{$_} && (!defined $blamed || $_ ne $blamed) && !$KNOWN{$_} } @{ $t->{keys} };
        if (!defined $blamed) { $self->_give_up(\@rest, "the trial process stopped: $why"); @rest = () }
        for (@rest) { next if $self->{queued}{$_}++; push @{ $self->{queue} }, $_ }
    }
    push @{ $self->{trusted} }, @{ $t->{ok} || [] };
    return;
}

sub _refuse {
    my ($self, $key, $why) = @_;
    $KNOWN{$key} = 1;
    push @{ $self->{trial}{refused} }, $key if $self->{trial};
    $self->{log}->("not preloading " . _module($key) . ", which its vassals loaded lazily (not tried again): $why");
    return;
}

# In the base: a module its trial loaded.
sub _load {
    my ($self, $key) = @_;
    my ($ok, $why, undef, @changed) = ForkServer::Base::LoadTrial::require_module($key);
    if (!$ok) {
        delete $INC{$key};
        $KNOWN{$key} = 1;    # never tried again
        $self->{log}->("could not load " . _module($key) . ", which its vassals loaded lazily (not tried again): "
            . ForkServer::Base::LoadTrial::one_line($why));
        return;
    }
    $self->{log}->(_module($key) . " as it loaded in the base: " . join(', ', @changed) . " (what could be, put back)") if @changed;
    push @{ $self->{loaded} }, $key;
    return;
}

=head2 close()

In a process forked from the base: lets go of the base's socket and of a
trial's pipe (the address stays known, to report to).

=cut

sub close {
    my ($self) = @_;
    CORE::close(delete $self->{sock}) if $self->{sock};
    CORE::close((delete $self->{trial})->{fh}) if $self->{trial};
    return;
}

1;
