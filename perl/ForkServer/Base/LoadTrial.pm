package ForkServer::Base::LoadTrial;
use strict;
use warnings;

use Cwd ();
use IO::Handle ();
use POSIX ();
use Time::HiRes ();
use ForkServer::Process::Descriptors ();
use ForkServer::Process::Session ();

# How the base requires a module its vassals loaded lazily
# (ForkServer::Base::Learned): with only the absolute directories of its
# @INC, and what the loading changed of the process seen: signal handlers,
# %ENV, umask, working directory, $0, $/, $\, $, (put back), an alarm
# (cancelled), @INC (a hook or directory the module added: the local drops
# it), a descriptor left open, closed or replaced, a thread or a process
# started, a sub in CORE::GLOBAL:: or UNIVERSAL:: (every app's code would
# see it); and the trial process that does it first, in a fork of the base,
# holding none of the base's descriptors but stdio. A module that changes
# any of that, or takes more than $SLOW seconds to load in its trial, is
# not loaded in the base.

# Seconds: a module slower than this to load in its trial would hold up
# the adoptions that come while the base loads it (the Emperor's
# adopt-timeout is 10 s); a variable so that a test need not wait as long.
our $SLOW = 5;

# In the trial process: each module required as the base would, then said
# (T KEY before, then K KEY, F KEY<tab>WHY or S KEY<tab>WHAT; D at the end).
sub run {
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
            my ($loaded, $why, $took, @changed) = require_module($key);
            # what it started would outlive the trial
            if (my @started = grep { !$children{$_} } _children()) { kill 'KILL', @started }
            push @changed, sprintf 'took %.1f s to load (more than %g s would hold up adoptions)', $took, $SLOW
                if $took > $SLOW;
            if (!$loaded)    { print {$w} "F $key\t" . one_line($why) . "\n" }
            elsif (@changed) { print {$w} "S $key\t" . join(', ', @changed) . "\n" }
            else             { print {$w} "K $key\n" }
        }
        print {$w} "D\n";
        1;
    };
    POSIX::_exit($ok ? 0 : 1);
}

sub one_line {
    my ($why) = @_;
    $why //= 'unknown error';
    $why =~ s/\s+\z//;
    $why =~ s/\s*\n\s*/ /g;
    $why =~ s/\t/ /g;
    return length $why > 300 ? substr($why, 0, 300) . '...' : $why;
}

# require $key with only the absolute directories of @INC; what it changed
# of the process's state, put back. (loaded, error, seconds it took, changed...)
sub require_module {
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

1;
