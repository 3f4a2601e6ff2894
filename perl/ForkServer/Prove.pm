package ForkServer::Prove;
use strict;
use warnings;

# prove's command line is App::Prove's own: this class is App::Prove with
# three overrides (which tests: --shard; how they run: forked from the base
# through ForkServer::Prove::Source; JUnit). Parsing prove's options (and
# .proverc, ~/.proverc, --norc, --rc, -M, -P, --state, --formatter...)
# with App::Prove itself rather than a table mirrored in Python means every
# option keeps prove's exact meaning, including the ones added by newer
# Test::Harness releases and by plugins.
use parent 'App::Prove';

use Cwd ();
use File::Spec ();
use Socket ();

use ForkServer::Prove::Failing ();
use ForkServer::Prove::Source ();
use ForkServer::Prove::Shard ();

=head1 NAME

ForkServer::Prove - prove (App::Prove) whose Perl tests are forked from a preloaded base

=head1 SYNOPSIS

  # what `emperor prove [OURS] [PROVE'S OPTIONS] [FILES]` runs, with a
  # UNIX socket on which the Emperor side starts the base and forks tests:
  perl -I perl -MForkServer::Prove -e 'exit ForkServer::Prove::main(@ARGV)' -- \
      --socket /tmp/x/prove.sock [--preload MODULE|FILE]... [--no-preload] \
      [--shard I/N] [--shard-times FILE] [--junit FILE] [--destruct] -- -lr -j2 t

=head1 DESCRIPTION

Everything prove does, prove does here (App::Prove, TAP::Harness, the
formatters, --state, --archive). A Perl test file that prove would run as
C<perl [SWITCHES] FILE> is instead forked from the base when the switches
allow it (see L<ForkServer::Prove::Source>); any other test runs as prove
runs it.

=head2 main

  exit ForkServer::Prove::main(@argv);

Returns prove's exit status (0 or 1; a bail-out dies with 255 as in prove).

=cut

our %OURS;    # our own options, for the source handler

sub main {
    my (@argv) = @_;
    my %ours = (preload => [], no_preload => 0, destruct => 0);
    while (@argv) {
        my $arg = shift @argv;
        last if $arg eq '--';
        if    ($arg eq '--socket')      { $ours{socket} = shift @argv }
        elsif ($arg eq '--config-fd')   { $ours{config_fh} = _config_handle(shift @argv) }
        elsif ($arg eq '--preload')     { push @{ $ours{preload} }, shift @argv }
        elsif ($arg eq '--no-preload')  { $ours{no_preload} = 1 }
        elsif ($arg eq '--shard')       { $ours{shard} = shift @argv }
        elsif ($arg eq '--shard-times') { $ours{shard_times} = shift @argv }
        elsif ($arg eq '--junit')       { $ours{junit} = shift @argv }
        elsif ($arg eq '--destruct')    { $ours{destruct} = 1 }
        elsif ($arg eq '--no-cold-retry') { $ours{no_cold_retry} = 1 }
        elsif ($arg eq '--no-learn')    { $ours{no_learn} = 1 }
        elsif ($arg eq '--timeout')     { $ours{timeout} = shift @argv }
        else { die "emperor prove: unknown option '$arg'\n" }
    }
    %OURS = %ours;
    if (defined $ours{shard}) {
        my ($i, $n) = eval { ForkServer::Prove::Shard::parse($ours{shard}) };
        if (!defined $n) {    # one line, exit 2: a bad option
            print STDERR $@;
            return 2;
        }
        @OURS{qw(shard_index shard_count)} = ($i, $n);
    }
    my $app = __PACKAGE__->new;
    $app->process_args(@argv);
    return $app->run ? 0 : 1;
}

# The write end of the pipe the base (started beside prove) reads its
# library directories and preloads from: written as soon as prove knows
# them (ForkServer::Prove::Source::setup), closed otherwise. Close-on-exec:
# the files prove runs itself must not hold the base's pipe open.
sub _config_handle {
    my ($fd) = @_;
    open my $fh, '>&=', $fd or return undef;
    require Fcntl;
    my $flags = fcntl $fh, Fcntl::F_GETFD(), 0;
    fcntl $fh, Fcntl::F_SETFD(), ($flags || 0) | Fcntl::FD_CLOEXEC() if defined $flags;
    return $fh;
}

# prove's help is the POD of the `prove` script, which App::Prove reads
# from $0 (ours is -e)
sub _help {
    my ($self, @args) = @_;
    require File::Basename;
    my ($prove) = grep { -f } File::Spec->catfile(File::Basename::dirname($^X), 'prove'),
        map { File::Spec->catfile($_, 'prove') } File::Spec->path;
    local $0 = $prove // $0;
    # prove exits 1 after its help; every `emperor` command's help exits 0
    require Pod::Usage;
    Pod::Usage::pod2usage({ -verbose => $args[0], -exitval => 0 });
    return;
}

# Times from a previous run (--state=save's, or without --state our record
# of the last run) and several jobs: the slowest files first (a long file
# started last is the run's tail), unless the order or the choice is the
# user's (--state=slow,failed..., -s, --reverse).
# --shard I/N: this part of what prove would run, in that order.
sub _get_tests {
    my $self  = shift;
    my @tests = $self->SUPER::_get_tests(@_);
    @tests = _slowest_first($self, @tests);
    return @tests unless $OURS{shard_count};
    my %times = ForkServer::Prove::Shard::previous_times(
        state => $self->state_manager, junit => $OURS{shard_times});
    my %mine = map { $_ => 1 } ForkServer::Prove::Shard::part(
        \@tests, $OURS{shard_index}, $OURS{shard_count}, \%times);
    return grep { $mine{$_} } @tests;
}

sub _slowest_first {
    my ($self, @tests) = @_;
    my @switches = map { split /,/ } @{ $self->state || [] };
    return @tests if ($self->jobs || 1) < 2 || $self->shuffle || $self->backwards;
    # prove's --state=save, else (no --state) our record of the last run
    my $state = !@switches ? _memory_of($self)
        : !grep({ $_ ne 'save' } @switches) ? $self->state_manager : undef;
    return @tests unless $state;
    my %times = ForkServer::Prove::Shard::previous_times(state => $state);
    return @tests unless %times;
    # a file without a time (new) first: it may be long
    my %order = map { $tests[$_] => $_ } 0 .. $#tests;
    return sort { ($times{$b} // 9e9) <=> ($times{$a} // 9e9) || $order{$a} <=> $order{$b} } @tests;
}

# With the preload left to us, a run of no more files than jobs gains
# nothing from a base: it would load what each file loads, and each file
# starts at once. (--preload, --no-preload and --timeout ask for forks.)
sub _no_base_pays {
    my ($self, @tests) = @_;
    return 0 if @{ $OURS{preload} } || $OURS{no_preload} || defined $OURS{timeout};
    my $jobs = $self->jobs || 1;
    return @tests <= $jobs;
}

sub _runtests {
    my ($self, $args, @tests) = @_;
    my $memory;
    no warnings 'redefine';
    my $create = \&TAP::Harness::Env::create;
    # the time of each file, for the next run's order (as prove's --state keeps it)
    local *TAP::Harness::Env::create = sub {
        my $harness = $create->(@_);
        $harness->callback(after_test => sub {
            my ($job, $parser) = @_;
            ForkServer::Prove::Failing::after_test(ForkServer::Prove::Source::record(), $job->[0], $parser);
            return unless $memory && $parser->start_time && $parser->end_time;
            eval { $memory->results->test($job->[0])->elapsed($parser->end_time - $parser->start_time); 1 };
        });
        return $harness;
    };
    my $ok = _runtests_with($self, $args, \$memory, @tests);
    _save_memory($memory) if $memory;
    return $ok;
}

# Our record of the last run (below), when this run keeps one: the preload
# left to us or --no-preload (which uses it for the order and the files to
# start cold, not for a preload), no --state, no --no-learn; false
# otherwise. Read once.
sub _memory_of {
    my ($self) = @_;
    return $self->{emperor_memory} //= do {
        my $ours = !@{ $OURS{preload} };
        ($ours && !$OURS{no_learn} && !@{ $self->state || [] } && _memory()) || 0;
    };
}

# Without --state, what the files of this directory loaded (and which of
# them had to run cold) is kept between runs in a cache file of ours, an
# App::Prove::State store (prove's own .prove is only written with
# --state): the second run preloads what most files loaded, as with
# --state, without the user asking. `--no-learn` turns it off.
sub _memory_path {
    require Digest::MD5;
    my $cache = $ENV{XDG_CACHE_HOME};
    $cache = File::Spec->catdir($ENV{HOME}, '.cache') unless defined $cache && length $cache;
    return undef unless defined $cache && length $cache;
    return File::Spec->catfile($cache, 'emperor-prove', Digest::MD5::md5_hex(Cwd::getcwd()) . '.yml');
}

sub _memory {
    my $path = _memory_path() // return undef;
    require App::Prove::State;
    # a store that does not read (damaged, another version's) is started afresh
    return eval { App::Prove::State->new({ store => $path }) }
        || eval { unlink $path; App::Prove::State->new({ store => $path }) };
}

sub _save_memory {
    my ($memory) = @_;
    my $path = $memory->{store};
    (my $dir = $path) =~ s{/[^/]*\z}{};
    require File::Path;
    eval { File::Path::make_path($dir); 1 } or return;
    # written aside and renamed: two runs in one directory leave one whole record
    local $memory->{store} = "$path.$$";
    eval { $memory->save; rename "$path.$$", $path or unlink "$path.$$"; 1 } or unlink "$path.$$";
    return;
}

sub _runtests_with {
    my ($self, $args, $memory, @tests) = @_;
    my $source = 'ForkServer::Prove::Source';
    if ($self->exec) {
        close delete $OURS{config_fh} if $OURS{config_fh};
        $source->note("--exec: every test runs through the given command, none is forked");
    }
    elsif (_no_base_pays($self, @tests)) {
        # every file would start before a base could serve it: run them as
        # prove does, and let the base (started early) go
        close delete $OURS{config_fh} if $OURS{config_fh};
        eval { ForkServer::Prove::Iterator::request($OURS{socket}, 'N', ''); 1 };
    }
    else {
        my $auto = !$OURS{no_preload} && !@{ $OURS{preload} };
        # without --state, our own record of the last run of this directory
        $$memory = _memory_of($self) || undef;
        $source->setup(
            socket   => $OURS{socket},
            config_fh => delete $OURS{config_fh},
            destruct => $OURS{destruct},
            state    => (@{ $self->state || [] } ? $self->state_manager : $$memory),
            memory   => ($$memory ? 1 : 0),
            libs     => [map { File::Spec->rel2abs($_) } @{ $args->{lib} || [] }],
            preload  => $OURS{preload},
            auto     => $auto,
            tests    => \@tests,
            quiet    => ($self->quiet || $self->really_quiet),
        );
    }
    return $self->SUPER::_runtests($args, @tests) unless defined $OURS{junit};
    require ForkServer::Prove::JUnit;
    my $junit = ForkServer::Prove::JUnit->new;
    no warnings 'redefine';
    my $create = \&TAP::Harness::Env::create;
    local *TAP::Harness::Env::create = sub {
        my $harness = $create->(@_);
        $junit->attach($harness);
        return $harness;
    };
    my $ok = $self->SUPER::_runtests($args, @tests);
    $junit->write($OURS{junit});
    return $ok;
}

1;
