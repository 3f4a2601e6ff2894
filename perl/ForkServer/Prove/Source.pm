package ForkServer::Prove::Source;
use strict;
use warnings;

# prove's own Perl handler, so that the command it would run (perl, the
# switches from -w/-T/HARNESS_PERL_SWITCHES/the shebang, -I, the test's
# arguments) is built by prove's code; we only decide whether that command
# can be a fork of the base instead.
use parent 'TAP::Parser::SourceHandler::Perl';

use TAP::Parser::IteratorFactory ();
use Text::ParseWords ();

use ForkServer::Prove::ColdRules ();
use ForkServer::Prove::Failing ();
use ForkServer::Prove::Iterator ();
use ForkServer::Prove::Loads ();
use ForkServer::Prove::Spec ();

TAP::Parser::IteratorFactory->register_handler(__PACKAGE__);

=head1 NAME

ForkServer::Prove::Source - prove's Perl source handler, forking tests from the base when it can

=head1 DESCRIPTION

Votes just above L<TAP::Parser::SourceHandler::Perl> for every file that
handler would run, then runs it as a fork of the base when C<perl
[SWITCHES] FILE> can be reproduced in a fork, and as prove runs it (a fresh
C<perl>) when not, saying why on stderr once per reason:

=over

=item * perl switches other than C<-w> and C<-I> (C<-T>, C<-W>, C<-M>...,
from prove's options, HARNESS_PERL_SWITCHES, PERL5OPT or the shebang);

=item * the file carries C<# HARNESS-NO-PRELOAD> (yath's marker) or
C<# emperor-prove: no-preload>;

=item * the file changes C<%ENV> (a variable a preloaded file reads at its top
  level) or C<CORE::GLOBAL::> in a C<BEGIN> block before C<use> of a
module the base already loaded (it would see the module compiled before
its change);

=item * the file looks at C<$INC{'Some/Module.pm'}> or the symbol table
(C<${Some::Module::}{name}>, C<%Some::Module::>) of a module the base
loaded (whether it is loaded yet: in a fork it always is);

=item * C<--state> remembers that the file failed forked and passed cold;

=item * the base could not start.

=back

A forked file that fails is run again cold; when it then passes, that is
its verdict, C<--state> remembers it, and stderr says so; when it fails
cold too, see L<ForkServer::Prove::Failing>. A whole-file skip is run again
cold only when the base preloaded something of the suite's.

=cut

my %CFG;        # setup()'s arguments
my %NOTED;      # notes already given
my %BASE_INC;   # the files the base has loaded (keys of its %INC)
my %BARE_INC;   # those of the bare base (our code and Test2 only), when there is one
my %TOP_LEVEL_READ = (base => {}, bare => {});    # ForkServer::Prove::ColdRules's caches
our $LEARNED;   # the automatic preload came from --state's records
my %PREVIOUS_BASE_INC;    # the base's modules in the run before, by the record
my $PREVIOUS_KNOWN;       # whether the record says

# The record of runs this run reads and writes (ours, or --state's), if any.
sub record { return $CFG{state} }

sub note {
    my ($class, $msg) = @_;
    return if $NOTED{$msg}++;
    print STDERR "emperor prove: $msg\n";
    return;
}

=head2 setup

  ForkServer::Prove::Source->setup(socket => $path, libs => \@dirs, preload => \@modules_or_files,
      auto => $bool, tests => \@files, state => $state_manager, destruct => $bool, quiet => $bool);

Starts the base (through the Emperor side on C<socket>) with C<libs> in its
@INC and the preloads: the given ones, or with C<auto> the modules most test
files C<use>, named on stderr in one line (unless C<quiet>). The answer is
read when the first file is to run (prove sets up its harness meanwhile). Without a
base every test runs as prove runs it.

=cut

sub setup {
    my ($class, %args) = @_;
    %CFG = %args;
    my @items = map {"inc=$_"} @{ $args{libs} };
    for my $p (@{ $args{preload} }) {
        push @items, ($p =~ m{/|\.p[lm]\z} && -f $p) ? "file=" . Cwd::abs_path($p) : "module=$p";
    }
    my @auto = !$args{auto} ? ()
        : $args{state} ? auto_preloads_from_state($args{state}, @{ $args{tests} })
        : ForkServer::Prove::Loads::use_line_preloads(@{ $args{tests} });
    @auto = grep { my $why = ForkServer::Prove::ColdRules::acts_on_every_test($_, @{ $args{libs} }, @INC);
                   $class->note("not preloading $_: $why") if $why && !$args{quiet}; !$why } @auto;
    push @items, map {"optional=$_"} @auto;
    # Nothing preloaded: the inherited heap is small, and perl's own global
    # destruction at exit is then cheaper than freeing what the test loaded
    # package by package (ForkServer::Prove::TestFile's fast exit), and exact.
    $CFG{preloads_nothing} = !grep { !/\Ainc=/ } @items;
    $CFG{destruct} = 1 if $CFG{preloads_nothing};
    # Something preloaded: a bare base beside the full one (cloned before
    # the preloads), for the files the preloads would change (below)
    push @items, 'bare=1' if !$CFG{destruct} && $args{config_fh} && _may_need_bare(@{ $args{tests} });
    # The base started beside prove reads them from its pipe: it starts
    # preloading now, not once the Emperor side has read our request.
    if (my $fh = delete $CFG{config_fh}) {
        local $SIG{PIPE} = 'IGNORE';    # no base after all: the request says why
        syswrite $fh, join "\0", @items;
        close $fh;
    }
    # The answer is waited for when the first file is to run (_await_base):
    # prove sets up its harness, formatter and scheduler while the base
    # loads the preloads, rather than after.
    my $sock = eval { ForkServer::Prove::Iterator::request_nowait($args{socket}, 'B', join "\0", @items) };
    if (!$sock) {
        $class->_base_reply(undef, $@, \@auto);
        return;
    }
    @CFG{qw(pending auto_modules)} = ($sock, \@auto);
    return;
}

# Whether a file could be forked from a bare base: a cheap look at what
# the rules below look for (they need the base's %INC, not known yet);
# when none could, no bare base is made (its start, ~10 ms of CPU, saved).
sub _may_need_bare {
    my (@files) = @_;
    for my $file (@files) {
        my $t = $CFG{state} && eval { $CFG{state}->results->{tests}{$file} };
        return 1 if $t && (($t->{emperor_cold} // '') =~ /\Ait failed or skipped forked and passed cold\z/
            || $t->{emperor_blame});
        my $text = _head($file) // next;
        return 1 if $text =~ /\$INC\s*\{/ || ($text =~ /\bBEGIN\b/ && $text =~ /CORE::GLOBAL::|ENV/);
    }
    return 0;
}

# The base's answer to setup's request, when it is still to be read: the
# base's %INC keys, or why there is none.
sub _await_base {
    my ($class) = @_;
    my $sock = delete $CFG{pending} or return;
    my $reply = eval { ForkServer::Prove::Iterator::_read_all($sock) };
    my $error = $@;
    close $sock;
    $class->_base_reply($reply, $error, delete $CFG{auto_modules});
    return;
}

sub _base_reply {
    my ($class, $reply, $error, $auto) = @_;
    my %args = %CFG;
    my @auto = @{ $auto || [] };
    if (!defined $reply || $reply !~ s/\Aok\n//) {
        my $why = defined $reply ? $reply : $error;
        $why =~ s/\s+\z//;
        if (@{ $args{preload} }) {    # asked for: one error, as for any bad option
            print STDERR "emperor prove: $why\n";
            CORE::exit(2);
        }
        $class->note("no base ($why): every test runs as prove runs it");
        $CFG{disabled} = 1;
        return;
    }
    %BASE_INC = map { my ($k, $v) = split /\t/, $_, 2; ($k => $v // 1) } split /\0/, $reply;
    # the bare base's %INC, when it is serving (the Emperor side removes it otherwise)
    (my $bare_keys = $args{socket}) =~ s{[^/]*\z}{inc-keys.bare};
    if (open my $fh, '<', $bare_keys) {
        local $/;
        my $text = <$fh> // '';
        %BARE_INC = map { my ($k, $v) = split /\t/, $_, 2; ($k => $v // 1) } grep { length } split /\0/, $text;
    }
    _record_base_modules();
    if ($args{auto} && !$args{quiet}) {    # the ones that loaded
        my @loaded = grep { (my $key = "$_.pm") =~ s{::}{/}g; $BASE_INC{$key} } @auto;
        if ($LEARNED) {    # many (what they load, not only what they `use`): the first few
            my $more = @loaded > 8 ? ' and ' . (@loaded - 8) . ' more' : '';
            my $from = $args{memory} ? '' : ', --state';
            print STDERR "emperor prove: preloaded (what most test files loaded last time$from): "
                . (@loaded ? join(', ', @loaded[0 .. ($#loaded < 7 ? $#loaded : 7)]) . $more : 'nothing') . "\n";
        }
        else {
            print STDERR "emperor prove: preloaded (what most test files use): "
                . (@loaded ? join(', ', @loaded) : 'nothing') . "\n";
        }
    }
    return;
}

# The record keeps the base's modules of each run: a file that fails
# forked with modules the run before did not preload, and passes cold, is
# put down to them (ForkServer::Prove::Loads::blame) rather than to itself.
sub _record_base_modules {
    my $results = $CFG{state} && eval { $CFG{state}->results } or return;
    my $before = $results->{emperor_preload};
    %PREVIOUS_BASE_INC = map { $_ => 1 } split ' ', $before // '';
    $PREVIOUS_KNOWN = defined $before;
    $results->{emperor_preload} = join ' ', sort grep { ForkServer::Prove::Loads::is_module_key($_) } keys %BASE_INC;
    return;
}

# With --state: what the files loaded in the last run (ForkServer::Prove::Loads).
sub auto_preloads_from_state {
    my ($state, @files) = @_;
    my ($learned, @modules) = ForkServer::Prove::Loads::preloads($state, \@files, \&ForkServer::Prove::Loads::use_lines);
    return ForkServer::Prove::Loads::use_line_preloads(@files) unless $learned;
    $LEARNED = 1;
    return @modules;
}

sub _remember_loads {
    my ($file, @loaded) = @_;
    my $state = $CFG{state} or return;
    my @uses = map { (my $key = "$_.pm") =~ s{::}{/}g; $key } ForkServer::Prove::Loads::use_lines($file);
    ForkServer::Prove::Loads::remember($state, $file, \%BASE_INC, \@uses, @loaded);
    return;
}

# The program part of a file (up to __END__/__DATA__), or undef.
sub _head { return ForkServer::Prove::Loads::program_text(@_) }

sub can_handle {
    my ($class, $source) = @_;
    return 0 unless %CFG;
    $class->_await_base if $CFG{pending};
    return 0 if $CFG{disabled};
    my $vote = $class->SUPER::can_handle($source) or return 0;
    return $vote + 0.01;
}

# The reason this file must run cold (as prove runs it), or undef.
sub cold_reason {
    my ($class, $file, $switches, $shebang) = @_;
    for my $sw (@$switches) {
        next if $sw eq '-w';
        return "perl switch $sw cannot apply to a forked test";
    }
    if (defined $ENV{PERL5OPT} && length $ENV{PERL5OPT}) {
        for my $sw (Text::ParseWords::shellwords($ENV{PERL5OPT})) {
            next if $sw eq '-w' || $sw =~ /\A-I/;
            return "PERL5OPT's $sw cannot apply to a forked test";
        }
    }
    # (the first `perl`: `#!/usr/bin/perl -w  # -*- perl -*-` has -w alone,
    # perl stops at the `#`)
    if (defined $shebang && $shebang =~ /^#!.*?\bperl\S*\s+(.*)/) {
        for my $sw (split ' ', $1) {
            last if $sw !~ /\A-/;
            next if $sw eq '-w' || $sw =~ /\A-[Tt]+\z/;    # -T/-t: prove puts them on the command line
            return "shebang switch $sw cannot apply to a forked test";
        }
    }
    my $text = _head($file) // return "cannot read $file";
    return "it asks for no preload (# HARNESS-NO-PRELOAD)" if $text =~ /^\s*#\s*HARNESS-NO-PRELOAD\s*$/m;
    return "it asks for no preload (# emperor-prove: no-preload)"
        if $text =~ /^\s*#\s*emperor-prove:\s*no-preload\s*$/m;
    return _preload_reason($file, $text, 0);
}

# Why the base's preloads would change what the file sees, or undef;
# `$bare`: for the bare base (against its %INC).
sub _preload_reason {
    my ($file, $text, $bare) = @_;
    my $base_inc = $bare ? \%BARE_INC : \%BASE_INC;
    if (my $state = $CFG{state}) {
        my $t = eval { $state->results->{tests}{$file} };    # test() would add it
        return ($CFG{memory} ? "last run" : "--state") . ": it failed or skipped, forked and cold"
            if ForkServer::Prove::Failing::failed_both_ways($t);
        my $why = $t && $t->{emperor_cold};
        return ($CFG{memory} ? "last run" : "--state") . ": $why"
            if $why && (!$bare || $why =~ /from a bare base/);
        # put down to modules the next run's preload kept after all (too few
        # of the files that load them broke)
        my @still = grep { $base_inc->{$_} } split ' ', ($t && $t->{emperor_blame}) // '';
        return ($CFG{memory} ? "last run" : "--state") . ": it failed or skipped forked and passed cold ("
            . join(', ', map { ForkServer::Prove::Loads::module_of($_) } @still) . " preloaded)" if @still;
    }
    $text = ForkServer::Prove::ColdRules::with_done_files($text);
    my $changes = ForkServer::Prove::ColdRules::changes_before_preloaded_use($text, $base_inc,
        $TOP_LEVEL_READ{ $bare ? 'bare' : 'base' }, [ForkServer::Prove::ColdRules::helper_dirs($file, $text)]);
    return "it sets $changes before using a preloaded module" if $changes;
    # `ok !$INC{'Moo/Role.pm'}`: whether a module is loaded yet; in a
    # fork of the base it always is (it would fail forked, then run cold)
    while ($text =~ /\$INC\s*\{\s*(['"])([\w\/]+\.pm)\1\s*\}/g) {
        return "it looks at \$INC{'$2'} (preloaded)" if $base_inc->{$2};
    }
    # what a `use` adds to %INC (Module-Runtime's t/dependency.t): in a fork,
    # nothing, for a module the base loaded
    (my $code = $text) =~ s/^\s*#.*$//mg;
    for my $module ($code =~ /(?<![\$\@\w])%INC\b(?!\s*\{)/ ? $code =~ /^\s*use\s+([A-Z][\w:]*)/mg : ()) {
        (my $inc = "$module.pm") =~ s{::}{/}g;
        return "it looks at %INC, with $module preloaded" if $base_inc->{$inc};
    }
    # `exists ${Test::Builder::}{new}`, `%Foo::`: the same question asked of
    # a package's symbol table
    while ($text =~ /(?:\$\{\s*|%\{?\s*|\$)((?:[A-Za-z_]\w*::)+)(?![\w:])/g) {
        my $package = $1;
        (my $inc = $package) =~ s{::\z}{.pm};
        $inc =~ s{::}{/}g;
        return "it looks at the symbol table %$package (preloaded)" if $base_inc->{$inc};
    }
    return undef;
}

# Whether a file that must not be forked from the full base because of
# its preloads can be forked from the bare base instead: the same rules,
# against what the bare base loaded (our own code and Test2). A file that
# fails there is run again cold, as any forked file.
sub _bare_fits {
    my ($file, $reason) = @_;
    return 0 unless %BARE_INC;
    return 0 unless $reason =~ /\Ait (?:sets|looks at) /
        || $reason =~ /: it failed or skipped forked and passed cold(?:\z| \()/;
    my $text = _head($file) // return 0;
    return !defined _preload_reason($file, $text, 1);
}

sub _create_iterator {
    my ($class, $source, $command, $setup, $teardown) = @_;
    my $cold = sub { $class->SUPER::_create_iterator($source, $command, $setup, $teardown) };
    my $file = ${ $source->raw };
    my @args = @{ $source->test_args || [] };
    my @switches = @{$command}[1 .. $#$command - 1 - @args];
    my $reason = $command->[0] ne $^X
        ? "HARNESS_PERL ($command->[0]) is not the base's perl"
        : $class->cold_reason($file, \@switches, $source->meta->{file}{shebang});
    my $bare = defined $reason && _bare_fits($file, $reason);
    if ($bare) {
        $class->note("$file runs forked from a bare base (none of the suite's modules loaded): $reason");
    }
    elsif (defined $reason) {
        $class->note($reason =~ /\Ait |\A--state|\Alast run/ ? "$file runs cold: $reason" : "$reason: such files run as prove runs them");
        return $cold->();
    }
    $setup->(@$command);
    my %env = %ENV;
    $teardown->(@$command);
    my $warnings = (grep { $_ eq '-w' } @switches) ? 1 : 0;
    $warnings ||= 1 if ($ENV{PERL5OPT} // '') =~ /(?:^|\s)-w\b/;
    $warnings ||= 1 if ($source->meta->{file}{shebang} // '') =~ /^#!.*\bperl\S*\s+(?:-\S+\s+)*-w\b/;
    # with --state, the file says what it loaded (for the next run's preload)
    # (a file forked from the bare base loads what it loads: nothing to learn
    # against the full base; its small inherited heap is destroyed as by perl)
    my $loads = $CFG{state} && !$bare ? _loads_path() : undef;
    my $spec = ForkServer::Prove::Spec::encode(
        file => $file, cwd => Cwd::getcwd(), args => \@args, env => \%env, perl => $command->[0],
        warnings => $warnings, merge => $source->merge, destruct => ($bare ? 1 : $CFG{destruct}),
        loads => $loads);
    return ForkServer::Prove::Iterator->new({
        socket => $CFG{socket}, file => $file, spec => $spec, cold => $cold, bare => $bare,
        on_cold_pass => sub { _remember_cold($file, $bare) },
        on_cold_fail => sub { ForkServer::Prove::Failing::remember($CFG{state}, $file) },
        # (none of the suite's modules in the base: a whole-file skip is the file's own)
        skip_is_verdict => ($bare || $CFG{preloads_nothing}),
        (defined $loads ? (loads => $loads, on_loads => sub { _remember_loads($file, @_) }) : ()),
    });
}

# A file in the Emperor side's private directory (the socket's), one per test.
my $LOADS_SEQ = 0;

sub _loads_path {
    (my $dir = $CFG{socket}) =~ s{/[^/]*\z}{};
    return "$dir/loads-" . ++$LOADS_SEQ;
}

sub _remember_cold {
    my ($file, $bare) = @_;
    my $t = $CFG{state} && eval { $CFG{state}->results->test($file) };
    my @blamed = ($t && !$bare && $PREVIOUS_KNOWN)
        ? ForkServer::Prove::Loads::blame($t, \%BASE_INC, \%PREVIOUS_BASE_INC) : ();
    if (@blamed) {
        __PACKAGE__->note("$file failed forked and passed cold, with "
            . join(', ', map { ForkServer::Prove::Loads::module_of($_) } @blamed)
            . " newly preloaded: its verdict is the cold run's ("
            . ($CFG{memory} ? "remembered" : "--state remembers it")
            . " against those modules for the next run's preload)");
        return;
    }
    my $from = $bare ? ' from a bare base' : '';
    __PACKAGE__->note("$file failed or skipped forked$from and passed cold: its verdict is the cold run's"
        . (!$CFG{state} ? "" : $CFG{memory} ? " (remembered for the next run)" : " (--state remembers it)"));
    my $state = $CFG{state} or return;
    eval { $state->results->test($file)->{emperor_cold} = "it failed or skipped forked$from and passed cold"; 1 };
    return;
}

1;
