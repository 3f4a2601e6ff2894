package ForkServer::Base::LoadTrial;
use strict;
use warnings;

use Cwd ();
use IO::Handle ();
use POSIX ();
use ForkServer::Process::Session ();

# How the base requires a module its vassals loaded lazily
# (ForkServer::Base::Learned): with only the absolute directories of its
# @INC, and what the loading changed of the process seen (signal handlers,
# %ENV, umask, working directory put back; descriptors left open, threads
# started); and the trial process that does it first, in a fork of the base.

# In the trial process: each module required as the base would, then said
# (T KEY before, then K KEY, F KEY<tab>WHY or S KEY<tab>WHAT; D at the end).
sub run {
    my ($w, $parent, @keys) = @_;
    my $ok = eval {
        ForkServer::Process::Session::die_with_parent(POSIX::SIGKILL());
        $SIG{$_} = 'DEFAULT' for qw(TERM INT PIPE CHLD);
        $0 .= ' (trying modules)';
        $w->autoflush(1);
        for my $key (@keys) {
            print {$w} "T $key\n";
            next if $INC{$key};
            my ($loaded, $why, @changed) = require_module($key);
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
# of the process's state, put back. (loaded, error, changed...)
sub require_module {
    my ($key) = @_;
    my %sig = map { $_ => $SIG{$_} } grep { defined $SIG{$_} } keys %SIG;
    my %env = %ENV;
    my $umask = umask;
    my $cwd = Cwd::getcwd();
    my %fds = map { $_ => 1 } _entries('/proc/self/fd');
    my $threads = () = _entries('/proc/self/task');
    my $error;
    my $ok = do {
        local ($@, $!, $?, $_);
        local @INC = grep { !ref $_ && defined $_ && m{\A/} } @INC;
        eval { require $key; 1 } ? 1 : do { $error = $@; 0 };
    };
    my @changed = _put_back(\%sig, \%env, $umask, $cwd);
    # what cannot be put back: a descriptor a vassal would find closed (it
    # closes the base's), a thread no fork copies
    my $opened = grep { !$fds{$_} } _entries('/proc/self/fd');
    push @changed, "$opened descriptor" . ($opened == 1 ? '' : 's') . " left open" if $opened;
    push @changed, 'a thread started' if _entries('/proc/self/task') > $threads;
    return ($ok, $error, @changed);
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
    my ($sig, $env, $umask, $cwd) = @_;
    my @changed;
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
