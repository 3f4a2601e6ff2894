package ForkServer::Base::Learned;
use strict;
use warnings;

use Cwd ();
use IO::Handle ();
use POSIX ();
use Socket qw(AF_UNIX SOCK_DGRAM SOL_SOCKET MSG_DONTWAIT pack_sockaddr_un);
use Socket::MsgHdr ();
use Time::HiRes ();
use ForkServer::Process::Descriptors ();
use ForkServer::Process::Session ();

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

What the base accepts, and only that:

=over

=item * reports sent by a process running as the base's own uid (the
kernel's C<SCM_CREDENTIALS> on a datagram socket in the abstract
namespace: any local process can find its name in F</proc/net/unix> and
send to it, so the sender's uid, which the kernel writes, is the check): a
vassal that runs as another user (C<uid>), or any other user's process,
never makes the base load anything;

=item * C<%INC> keys of a package name (C<Foo/Bar.pm>, words only), at
most C<MAX_MODULES> a report;

=item * files that the base finds itself, in the absolute directories of
its own C<@INC> (never C<.>, never a relative directory), and that are the
very file the vassal loaded (a vassal that found a module of the same name
elsewhere, in a directory of its own, is not followed).

=back

Each module is first tried in a process forked from the base (a trial,
L</work>, which holds none of the base's descriptors but its standard
ones): one that dies as it loads, ends the process, changes the
process's signal handlers, C<%ENV>, umask, working directory, C<$0>,
C<$/>, C<$\> or C<$,>, sets an alarm, leaves a descriptor open, closes or
replaces one, starts a thread or a process, overrides a built-in
(C<CORE::GLOBAL::>), adds a method to C<UNIVERSAL> or changes C<@INC>, or takes more than C<$SLOW>
seconds to load (it would hold up the adoptions that come meanwhile), is
not loaded in the base (one line, never tried again), and the vassals keep
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
# Seconds: a module slower than this to load in its trial would hold up
# the adoptions that come while the base loads it (the Emperor's
# adopt-timeout is 10 s); a variable so that a test need not wait as long.
our $SLOW = 5;

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
whether it loaded, died, or changed the process's state as it loaded
(signal handlers, C<%ENV>, umask, working directory, Perl's C<$0>, C<$/>,
C<$\>, C<$,>, an alarm, a descriptor left open, closed or replaced, a
thread, a process: killed, a sub in C<CORE::GLOBAL::> or C<UNIVERSAL::>, C<@INC>), or took more than C<$SLOW> seconds; it ends at once
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
        _trial($w, $parent, @keys);    # does not return
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

# In the trial process: each module required as the base would, then said.
sub _trial {
    my ($w, $parent, @keys) = @_;
    my $ok = eval {
        ForkServer::Process::Session::die_with_parent(POSIX::SIGKILL());
        # none of the base's sockets and pipes (a spare it lets go must see
        # their end now, not when the trial ends): /dev/null in their place
        ForkServer::Process::Descriptors::close_all_but(0, 1, 2, fileno $w);
        $SIG{$_} = 'DEFAULT' for qw(TERM INT PIPE CHLD);
        $0 .= ' (trying modules)';
        $w->autoflush(1);
        my %children = map { $_ => 1 } _children();
        for my $key (@keys) {
            print {$w} "T $key\n";
            next if $INC{$key};
            my ($loaded, $why, $took, @changed) = _require($key);
            # what it started would outlive the trial
            if (my @started = grep { !$children{$_} } _children()) { kill 'KILL', @started }
            push @changed, sprintf 'took %.1f s to load (more than %g s would hold up adoptions)', $took, $SLOW
                if $took > $SLOW;
            if (!$loaded)    { print {$w} "F $key\t" . _one_line($why) . "\n" }
            elsif (@changed) { print {$w} "S $key\t" . join(', ', @changed) . "\n" }
            else             { print {$w} "K $key\n" }
        }
        print {$w} "D\n";
        1;
    };
    POSIX::_exit($ok ? 0 : 1);
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

sub _one_line {
    my ($why) = @_;
    $why //= 'unknown error';
    $why =~ s/\s+\z//;
    $why =~ s/\s*\n\s*/ /g;
    $why =~ s/\t/ /g;
    return length $why > 300 ? substr($why, 0, 300) . '...' : $why;
}

# require $key with only the absolute directories of @INC; what it changed
# of the process's state, put back. (loaded, error, seconds it took, changed...)
sub _require {
    my ($key) = @_;
    my %sig = map { $_ => $SIG{$_} } grep { defined $SIG{$_} } keys %SIG;
    my %env = %ENV;
    my $umask = umask;
    my $cwd = Cwd::getcwd();
    my %vars = _vars();
    my %fds = _descriptors();
    my %children = map { $_ => 1 } _children();
    my %globals = map { $_ => 1 } _globals();
    my $threads = () = _entries('/proc/self/task');
    my $alarm = alarm 0;
    alarm $alarm if $alarm;
    my ($error, $inc_changed);
    my $started = Time::HiRes::time();
    my $ok = do {
        local ($@, $!, $?, $_);
        local @INC = grep { !ref $_ && defined $_ && m{\A/} } @INC;
        my $was = join "\0", @INC;    # a hook (a reference) by its address
        my $loaded = eval { require $key; 1 } ? 1 : do { $error = $@; 0 };
        # what it put in @INC (a hook, a directory) goes with the local: its code would miss it
        $inc_changed = join("\0", map { $_ // '' } @INC) ne $was;
        $loaded;
    };
    my $took = Time::HiRes::time() - $started;
    my @changed = _put_back(\%sig, \%env, $umask, $cwd, \%vars);
    push @changed, '@INC changed' if $inc_changed;
    # an alarm would end the base (and its forks do not inherit it): cancelled
    if (!$alarm && (my $left = alarm 0)) { push @changed, "an alarm set (in $left s)" }
    # what cannot be put back: a descriptor a vassal would find closed (it
    # closes the base's), one of the base's replaced or closed, a thread no
    # fork copies, a process
    my %now = _descriptors();
    my $opened = grep { !exists $fds{$_} } keys %now;
    push @changed, "$opened descriptor" . ($opened == 1 ? '' : 's') . " left open" if $opened;
    for my $fd (sort { $a <=> $b } keys %fds) {
        if (!exists $now{$fd})          { push @changed, "descriptor $fd closed" }
        elsif ($now{$fd} ne $fds{$fd})  { push @changed, "descriptor $fd replaced" }
    }
    push @changed, 'a thread started' if _entries('/proc/self/task') > $threads;
    push @changed, 'a process started' if grep { !$children{$_} } _children();
    # code compiled after it, in every vassal adopted after it, whatever its app, would call them
    push @changed, map { "$_ defined" } grep { !$globals{$_} } _globals();
    return ($ok, $error, $took, @changed);
}

# The process's descriptors: number => what it is.
sub _descriptors {
    return map { $_ => readlink("/proc/self/fd/$_") // '' } _entries('/proc/self/fd');
}

# The pids of this process's children.
sub _children {
    my @pids;
    for my $tid (_entries('/proc/self/task')) {
        open my $fh, '<', "/proc/self/task/$tid/children" or next;
        push @pids, split ' ', scalar(<$fh>) // '';
    }
    return @pids;
}

# The subroutines every package sees: built-ins overridden
# (CORE::GLOBAL::), methods of every class (UNIVERSAL::).
sub _globals {
    no strict 'refs';
    return map { my $pkg = $_; map { "${pkg}::$_" } grep { defined &{"${pkg}::$_"} } sort keys %{"${pkg}::"} }
        'CORE::GLOBAL', 'UNIVERSAL';
}

# Perl's process-wide variables a module may set at load time, which the
# base's code and every process forked from it read.
sub _vars {
    return ('$0' => $0, '$/' => $/, '$\\' => $\, '$,' => $,);
}

# The entries of a /proc directory (but the one its reading opens).
sub _entries {
    my ($dir) = @_;
    opendir(my $dh, $dir) or return ();
    my $own = fileno $dh;
    my @names = grep { /\A\d+\z/ && $_ != $own } readdir $dh;
    closedir $dh;
    return @names;
}

# In the base: a module its trial loaded.
sub _load {
    my ($self, $key) = @_;
    my ($ok, $why, undef, @changed) = _require($key);
    if (!$ok) {
        delete $INC{$key};
        $KNOWN{$key} = 1;    # never tried again
        $self->{log}->("could not load " . _module($key) . ", which its vassals loaded lazily (not tried again): "
            . _one_line($why));
        return;
    }
    $self->{log}->(_module($key) . " as it loaded in the base: " . join(', ', @changed) . " (what could be, put back)") if @changed;
    push @{ $self->{loaded} }, $key;
    return;
}

# What a module's loading may change of the process's state, which the
# base's own serving relies on: put back as it was.
sub _put_back {
    my ($sig, $env, $umask, $cwd, $vars) = @_;
    my @changed;
    my %now = _vars();
    for my $name (sort keys %$vars) {
        my ($was, $is) = ($vars->{$name}, $now{$name});
        next if (defined $was ? $was : "\0undef") eq (defined $is ? $is : "\0undef");
        push @changed, "$name changed";
    }
    ($0, $/, $\, $,) = @{$vars}{'$0', '$/', '$\\', '$,'};
    for my $name (keys %SIG) {
        my ($now, $was) = ($SIG{$name}, $sig->{$name});
        next if !defined $now && !defined $was;
        next if defined $now && defined $was && (ref $now ? ref $was && $now == $was : !ref $was && $now eq $was);
        push @changed, "\$SIG{$name} changed";
        $SIG{$name} = $was;
    }
    my @env = grep { !exists $env->{$_} || ($ENV{$_} // '') ne ($env->{$_} // '') } keys %ENV;
    push @env, grep { !exists $ENV{$_} } keys %$env;
    if (@env) {
        push @changed, '%ENV changed';
        %ENV = %$env;
    }
    if (umask != $umask) {
        push @changed, 'umask changed';
        umask $umask;
    }
    my $now = Cwd::getcwd();
    if (defined $cwd && (!defined $now || $now ne $cwd)) {
        push @changed, 'the working directory changed';
        chdir $cwd;
    }
    return sort @changed;
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
