package ForkServer::Process::Exit;
use strict;
use warnings;

use POSIX ();

=head1 NAME

ForkServer::Process::Exit - a forked process's graceful exit, without the global destruction of the heap it inherited

=head1 SYNOPSIS

  use ForkServer::Process::Exit ();                      # first: its END block runs last
  ForkServer::Process::Exit::mark_base($base_object);    # in the base, once its codebase is loaded
  ForkServer::Process::Exit::without_global_destruction();   # in a process forked from it
  ForkServer::Process::Exit::without_global_destruction(unless_own_most => 1);   # or: perl's own
                                          # when the process loaded more module files than it inherited
  exit 0;    # END blocks, what the process holds freed, handles flushed, _exit

=head1 DESCRIPTION

A process forked from a preloaded base (an adopted vassal, its workers, a
test file of C<emperor prove>) leaves by C<exit> on a graceful stop, as
under any Plack server: perl unwinds the stack (lexicals, so the objects
only they hold, are freed and their C<DESTROY>/C<DEMOLISH> run), then runs
every C<END> block. Perl's global destruction would then walk and free
the whole heap, the inherited one included, writing to its pages: about
12,000 copied pages (50 MB) and 150 ms per process with the benchmark's
codebase (bench/heavy.psgi), 6,000 pages (25 MB) with a Catalyst app,
against 40 pages for C<_exit>.

So the last C<END> block (this module's: loaded before anything else, it
is the first defined) frees instead what the process itself still holds
in globals: the variables of every package that did not exist when the
base called C<mark_base> (what the process loaded itself: a new top-level
name and what is under it, a module file it required, its C<psgi> file's
package), so their objects' C<DESTROY> run (a package it declared without
a file of its own under a top-level name the base had is not found); then it runs
any C<END> block defined before this module, flushes every output handle
and calls C<_exit> with C<$?>. What is skipped: C<DESTROY> of objects the
process stored in the variables of packages the base had already loaded,
and of the objects it inherited: the ones given to C<mark_base> (the base
object, which holds the preloaded app and so everything the app holds)
stay referenced for the process's whole life, so that unwinding the stack
the base's code had on it when it forked frees nothing of theirs (the
benchmark's app: about 200 fewer copied pages a process). Their
C<DESTROY> runs in the base, at its own exit.

The codebase's own C<END> blocks run in every process, as under any
preforking server; one that frees what the process inherited makes it
copy those pages (Class::Singleton's, which frees every
L<DateTime::TimeZone> object: about 2,300 pages in each process of the
benchmark's app).

C<kill -9> and harakiri stay immediate (C<POSIX::_exit>, no C<END>).

=cut

my $FAST = 0;      # this process leaves without global destruction
my $UNLESS_OWN_MOST = 0;   # ... unless it loaded more module files than it inherited
# What the base had, for each stash whose new names are freed at exit:
# %main:: (top-level packages included) and %Plack::Sandbox:: (the packages
# Plack::Util::load_psgi made, one per psgi file); stash name -> [number
# of names, the names joined by NUL]. Plain strings, not a hash: see
# _new_names.
my %BASE_NAMES;
my @BASE_INC = (-1, '');   # %INC in the base: [number of files, the files joined by NUL]
my @INHERITED;     # what mark_base was given: referenced until the process ends

# Defined before anything else is loaded, so it is the last END block to run.
END { fast_exit() if $FAST }

my $EARLIER_END;   # END blocks compiled before this module's (array ref), found in the base

sub mark_base {
    @INHERITED = @_;
    %BASE_NAMES = map { $_ => [_names($_)] } 'main', 'Plack::Sandbox';
    @BASE_INC = (scalar(keys %INC), join("\0", keys %INC));
    # Found once here rather than at every exit: B costs a forked test
    # ~1.5 ms of CPU to load (measured: a tenth of a small test's own
    # CPU), the base loads it once; none can be compiled before this
    # module later on.
    $EARLIER_END = _earlier_end_blocks(1);
    return;
}

sub marked { return scalar %BASE_NAMES }

sub without_global_destruction {
    my (%opt) = @_;
    $FAST = 1;
    $UNLESS_OWN_MOST = $opt{unless_own_most} ? 1 : 0;
    return;
}

sub fast_exit {
    my $status = $?;
    # Freeing what the process loaded, package by package, costs more than
    # perl's global destruction (which frees no plain data) once that is
    # most of the heap: a test that loads a whole ORM over a base of
    # Test::More (DBIx-Class: 40 to 60 ms of CPU a file more). Perl's own
    # is then the cheaper exit, and the same as under prove.
    return if $UNLESS_OWN_MOST && keys(%INC) > 2 * $BASE_INC[0];
    _run_earlier_end_blocks(@{ $EARLIER_END // _earlier_end_blocks(0) // [] });
    # Only what is new since the base: walking every package would write to
    # the pages of every stash, and cost as much as global destruction.
    # Each package once: a test that loads a whole ORM adds hundreds of
    # %INC files under one new top-level name, and walking that name's
    # packages again for each file cost more than perl's own destruction.
    my %freed;
    my $free = sub { _free_globals($_) for grep { !$freed{$_}++ } @_ };
    # What these DESTROY methods do outside perl's global destruction, they
    # skip within it (where perl would have called them): Moo's placeholder
    # in $Moose::AUTHORITY loads Moose's meta-object protocol and inflates
    # every Moo class (30 to 70 ms of CPU in each process that loaded Moo
    # and not Moose). Its own switch (`no Moo::sification`) turns that off.
    $Moo::sification::disabled = 1 if $INC{'Moo/sification.pm'};
    for my $key (_new_names('main')) {
        if ($key =~ /\A(\w+)::\z/) {
            my $top = $1;
            next if $top eq 'main';    # %main:: itself
            $free->($top, _packages("${top}::", $top));
        }
        else { _free_global(\%main::, $key) }
    }
    # a psgi file the process loaded itself: its package's variables
    for my $key (grep { /\A(\w+)::\z/ } _new_names('Plack::Sandbox')) {
        my $pkg = "Plack::Sandbox::" . substr($key, 0, -2);
        $free->($pkg, _packages("${pkg}::", $pkg));
    }
    # a module it required itself under a top-level name the base had
    # (MyApp::Plugin beside a preloaded MyApp): %main:: shows nothing new
    for my $file (_new_keys(\%INC, @BASE_INC)) {
        next unless $file =~ m{\A(\w+(?:/\w+)*)\.pm\z};
        (my $pkg = $1) =~ s{/}{::}g;
        next if $freed{$pkg};    # with its packages, under a name freed above
        $free->($pkg, _packages("${pkg}::", $pkg));
    }
    { no warnings 'exec'; exec { '/' } '/' }    # fails, having flushed every output handle
    POSIX::_exit($status);
}

# END blocks compiled before this module's, not run yet (an array ref, or
# undef when unknown): perl keeps them newest first and shifts each off the
# list as it calls it. Before ours has run (`$ours_pending`, in the base)
# they are the ones after ours; once it runs, all that are left.
sub _earlier_end_blocks {
    my ($ours_pending) = @_;
    return undef unless $INC{'B.pm'} || eval { require B; 1 };
    my $end = B::end_av();
    return [] unless $end->isa('B::AV');
    my @blocks = $end->ARRAY;
    my $after = 0;
    if ($ours_pending) {
        my ($at) = grep { $blocks[$_]->isa('B::CV') && $blocks[$_]->FILE eq __FILE__ } 0 .. $#blocks;
        return undef unless defined $at;    # not found: looked up at exit instead
        $after = $at + 1;
    }
    return [map { $_->object_2svref } @blocks[$after .. $#blocks]];
}

sub _run_earlier_end_blocks {
    for my $code (@_) {
        eval { $code->(); 1 } or print STDERR $@;
    }
    return;
}

sub _stash { my ($name) = @_; no strict 'refs'; return \%{"${name}::"} }

sub _names {
    my ($name) = @_;
    my $stash = _stash($name);
    return (scalar(keys %$stash), join("\0", keys %$stash));
}

# The names a stash has that it had not in the base. Listing a stash's
# names writes to each name's shared string (its reference count), which
# lives in pages shared with the base: with the benchmark's codebase,
# listing %main:: copied about 600 pages (2.4 MB) at every exit of every
# process. A stash with as many names as in the base, each of them still
# there, has no new one: that is found by counting and looking up, which
# write nothing. (A name with a NUL in it makes the look-up fail: the
# names are then listed.)
sub _new_names {
    my ($name) = @_;
    return _new_keys(_stash($name), @{ $BASE_NAMES{$name} // [-1, ''] });
}

sub _new_keys {
    my ($hash, $count, $names) = @_;
    my @base = split /\0/, $names;
    return () if $count == keys %$hash && !grep { !exists $hash->{$_} } @base;
    my %base = map { $_ => 1 } @base;
    return grep { !$base{$_} } keys %$hash;
}

# Every package name under a stash, recursively ("Foo::Bar", ...).
sub _packages {
    my ($stash_name, $prefix) = @_;
    my @found;
    my $stash = do { no strict 'refs'; \%{$stash_name} };
    for my $key (keys %$stash) {
        next unless $key =~ /\A(\w+)::\z/ && $key ne 'main::';
        push @found, "${prefix}::$1", _packages("${stash_name}$key", "${prefix}::$1");
    }
    return @found;
}

# Undefines a package's variables that hold data (so objects in them are
# destroyed now), but not the ones perl and inheritance need.
my %KEEP = map { $_ => 1 } qw(ISA EXPORT EXPORT_OK EXPORT_TAGS INC ENV ARGV STDIN STDOUT STDERR _ 0 VERSION);

sub _free_globals {
    my ($package) = @_;
    my $stash = do { no strict 'refs'; \%{"${package}::"} };
    _free_global($stash, $_) for keys %$stash;
    return;
}

sub _free_global {
    my ($stash, $key) = @_;
    return if $KEEP{$key} || $key !~ /\A[^\W\d]\w*\z/;
    my $glob = $stash->{$key};
    return unless ref \$glob eq 'GLOB';
    # a DESTROY that dies, a tied or read-only variable (%Config): left alone
    eval { my $sref = *{$glob}{SCALAR}; $$sref = undef if ref $$sref; 1 };
    eval { my $aref = *{$glob}{ARRAY} or return; @$aref = () unless tied @$aref; 1 };
    eval { my $href = *{$glob}{HASH}  or return; %$href = () unless tied %$href; 1 };
    return;
}

1;
