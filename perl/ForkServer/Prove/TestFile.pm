package ForkServer::Prove::TestFile;
use strict;
use warnings;

use Fcntl qw(SEEK_SET);
use POSIX ();

# Loaded before anything else, so that its END block is the last to run
# in a test: after the test's, Test2's and every module's. See
# L</"Exit without global destruction">.
use ForkServer::Process::Exit ();

my $SPEC;           # the test this process turned into, once it has

use ForkServer::Protocol qw(decode_array);

# Test2 is told it is being preloaded before anything can load it, so that
# the state Test::More builds while the base loads is not the state of a
# test (Test2::API's preload mode, made for this).
# A base started early (`--config-fd`) does it once it has its library
# directories: the distribution under test may carry its own Test2.
sub _start_test2_preload {
    Test2::API::test2_start_preload() if eval { require Test2::API; 1 };
    return;
}
BEGIN { _start_test2_preload() unless grep { $_ eq '--config-fd' } @ARGV }

use Filter::Util::Call ();    # loaded here, not in every test
use ForkServer::Prove::Loads ();
use ForkServer::Prove::BareBase ();
use ForkServer::Prove::EarlyConfig ();
use ForkServer ();    # a modulino: loaded, not run
use ForkServer::Base ();

our $IN_BASE;    # true inside serve(): become_test() may jump out of it

=head1 NAME

ForkServer::Prove::TestFile - run a Perl test file in a process forked from a preloaded base (C<emperor prove>)

=head1 SYNOPSIS

  # the base `emperor prove` starts (the -M modules are the user's preloads):
  perl -I perl -MForkServer::Prove::TestFile -MTest::More -MMoose \
      -e 'BEGIN { ForkServer::Prove::TestFile::serve(@ARGV) }' \
      -- --fork-server /tmp/x/fork.sock [--preload FILE]... [--inc-report FILE]

  # an adoption request whose argv is [PROGRAM, "--test-file", "t/a.t"],
  # with the test's stdout as the Emperor pipe (mask 0x01) and its stderr
  # as the config pipe (0x02), which first carries the test's spec.

=head1 DESCRIPTION

A base for tests is an ordinary base vassal (L<ForkServer::Base>) whose
fork server runs inside a C<BEGIN> block of its main program. A test is an
adopted vassal whose argv starts with C<--test-file>: the fork server forks
as for any adoption (the reply carries the pid), and the child, instead of
configuring itself as a web vassal, leaves the fork server's call stack,
makes itself look like a fresh C<perl FILE> process, returns from the
C<BEGIN> block, and a source filter replaces the rest of the main program
with the test file (as L<goto::file> does for yath, plus C<DATA> handled as
perl does: the comment above C<_compile_next>). The test file is then the program perl runs: C<__FILE__>,
line numbers, C<__DATA__>, C<die> at the top level (exit status from C<$!>,
C<< $? >> 8 >> or 255), C<exit>, C<END> blocks and global destruction are
perl's own.

Before that, the child (L</become_test>):

=over

=item * reads its spec from the config pipe: an array packet of C<KEY=VALUE>
items (C<file>, C<cwd>, C<arg>, C<env>, C<inc>, C<warnings>, C<destruct>,
C<merge>: stderr is stdout, prove's C<--merge>; C<loads>: a file to write, at exit, the %INC keys the test added, for C<--state>);

=item * puts the Emperor pipe on descriptor 1, the config pipe on 2 and
F</dev/null> on 0;

=item * sets C<%ENV>, the working directory, C<$0>, C<@ARGV>, C<@INC>,
C<$^T>, C<$^W> as C<perl FILE> would have them, reseeds C<srand>, recomputes
L<FindBin>, reopens the C<DATA> handles of preloaded modules (so tests
running side by side do not share a file offset), and gives Test2 and
Test::Builder a fresh state writing to the new descriptors.

=back

=cut

=head2 serve

  serve(@argv)

Runs the base (L<ForkServer/main> with C<@argv>, after C<require>ing each
C<--preload FILE>, and writing the files in C<%INC> to C<--inc-report FILE>,
separated by NUL bytes). Returns only in a test child, from inside the C<BEGIN>
block, with the rest of the main program replaced by the test file. In the
base it exits when the base stops.

With C<--bare-pipe-fd N> and the config item C<bare=1>, a bare base too
(L<ForkServer::Prove::BareBase>).

=cut

sub serve {
    my (@argv) = @_;
    my (@base_argv, $inc_report, $inc_keys, $bare_fd, $bare);
    while (@argv) {
        my $arg = shift @argv;
        if ($arg eq '--config-fd') {
            unshift @argv, ForkServer::Prove::EarlyConfig::options(shift @argv);
            _start_test2_preload();
        }
        elsif ($arg eq '--bare-pipe-fd') { $bare_fd = shift @argv }
        elsif ($arg eq '--bare-base') {
            # before the preloads: a second fork server with nothing of the
            # suite loaded, for the files that must not see the preloads
            my $fd = $bare_fd;
            undef $bare_fd;    # closed in the base, the Emperor pipe in the clone
            next unless defined $fd && ForkServer::Prove::BareBase::clone($fd);
            $bare = 1;    # we are it: the preloads are the other base's
            ($inc_report, $inc_keys) = (undef, defined $inc_keys ? "$inc_keys.bare" : undef);
            ForkServer::Prove::BareBase::take_place(\@base_argv);
        }
        elsif ($bare && $arg =~ /\A--preload(?:-module|-optional)?\z/) { shift @argv }
        elsif ($arg eq '--lib') {
            require lib;
            lib->import(shift @argv);
        }
        elsif ($arg eq '--preload' || $arg eq '--preload-module') {
            my $what = shift @argv;
            (my $file = $what) =~ s{::}{/}g;
            $file .= '.pm' if $arg eq '--preload-module';
            my $ok = eval { package main; require $file; 1 };    ## no critic
            if (!$ok) {
                print STDERR "emperor prove: cannot preload '$what': $@";
                exit 2;
            }
        }
        elsif ($arg eq '--preload-optional') {
            # chosen automatically: one that does not load is left out
            (my $file = shift @argv) =~ s{::}{/}g;
            my %before = %INC;
            if (!eval { package main; require "$file.pm"; 1 }) {    ## no critic
                print STDERR "emperor prove: not preloading $file.pm: $@";
                delete $INC{$_} for grep { !exists $before{$_} } keys %INC;
            }
        }
        elsif ($arg eq '--inc-report') { $inc_report = shift @argv }
        elsif ($arg eq '--inc-keys')   { $inc_keys   = shift @argv }
        else { push @base_argv, $arg }
    }
    POSIX::close($bare_fd) if defined $bare_fd;    # no bare base was asked for
    # what the base loaded: files for `emperor prove --watch` to watch, and
    # %INC's keys for telling which tests change things before using them
    for ([$inc_report, sub { values %INC }],
         [$inc_keys, sub { map { defined $INC{$_} && !ref $INC{$_} ? "$_\t$INC{$_}" : $_ } keys %INC }]) {
        my ($path, $list) = @$_;
        next unless defined $path;
        open my $fh, '>', $path or die "'$path': $!\n";
        print $fh join "\0", grep { defined && !ref } $list->();
        close $fh or die "'$path': $!\n";
    }
    ForkServer::Process::Exit::mark_base();
    _find_data_handles();
    my $spec = _serve_until_a_test(@base_argv);
    _become(%$spec);
    _compile_next($spec->{file});
    return;
}

# The rest of the main program is the test file: a source filter gives
# perl its lines, after a preamble that leaves line numbers and __FILE__ the
# file's. When perl reaches __DATA__ (or __END__) it stops reading the
# filter; the file's handle is then positioned where perl's own DATA would
# be, and becomes the DATA of the package current there (main for
# __END__), with :utf8 under `use utf8`, as perl does for a file it reads.
my %TEST_FH;    # the test file and how far perl has read it

sub _compile_next {
    my ($file) = @_;
    open my $fh, '<', $file or die "cannot open '$file': $!\n";
    %TEST_FH = (file => $file, offset => 0);
    (my $quoted = $file) =~ s/"/\\"/g;
    my @lines = ('package main;', q{$@ = '';}, qq{#line 1 "$quoted"});
    my ($drained, $at_data);
    Filter::Util::Call::filter_add(sub {
        return 0 if $at_data;    # perl may ask again after __DATA__: the rest is DATA's
        # what is left of the base's own main program is dropped
        if (!$drained++) {
            1 while Filter::Util::Call::filter_read() > 0;
            $_ = '';
        }
        my $line;
        if (@lines) { $line = shift(@lines) . "\n" }
        else {
            local $.;    # no ", <$fh> line N" in the test's messages
            $line = <$fh>;
            # perl closes a program file it has read to its end; the
            # filter stays with the program, so its handle is closed here
            # (DATA, when there is one, has a handle of its own)
            unless (defined $line) { close $fh; return 0 }
            $TEST_FH{offset} += length $line;
            if ($line =~ /\A__(DATA|END)__\b/) {
                my $main = $1 eq 'END' ? 1 : 0;
                $at_data = 1;
                close $fh;
                $line = "BEGIN { ForkServer::Prove::TestFile::_data_here($main ? 'main' : __PACKAGE__, \$^H) } $line";
            }
        }
        $_ .= $line;
        return 1;
    });
    return;
}

sub _data_here {
    my ($package, $hints) = @_;
    # perl itself sets the DATA handle's descriptor after this BEGIN block:
    # ours is installed once compilation is over
    @TEST_FH{qw(package utf8)} = ($package, $hints & 0x00800000 ? 1 : 0);    # HINT_UTF8
    eval 'INIT { ForkServer::Prove::TestFile::_install_data() } 1' or die $@;    ## no critic
    return;
}

sub _install_data {
    # a handle of its own, at the offset after the marker's line
    open my $fh, '<', $TEST_FH{file} or return;
    seek $fh, $TEST_FH{offset}, SEEK_SET;
    binmode $fh, ':utf8' if $TEST_FH{utf8};
    no strict 'refs';
    no warnings 'once';
    *{"$TEST_FH{package}::DATA"} = $fh;
    return;
}

sub _serve_until_a_test {
    my (@argv) = @_;
    local $IN_BASE = 1;
    local $ForkServer::WEB_VASSALS = 0;
    PROVE_TEST_CHILD: {
        ForkServer->main(@argv);    # exits in the base
    }
    return $SPEC;
}

=head2 become_test

  become_test(argv => \@argv, stdout => $fh, config_text => $text, stderr => $fh)

Called by L<ForkServer::Base> in the adopted child, after the pid reply.
Does not return: it leaves the fork server's call stack for L</serve>.

=cut

sub become_test {
    my (%args) = @_;
    die "this base does not run test files (it is not an `emperor prove` base)\n" unless $IN_BASE;
    my $spec = parse_spec($args{config_text});
    my (undef, $file) = @{ $args{argv} };
    die "--test-file '" . ($file // '') . "' does not match the spec's '$spec->{file}'\n"
        unless defined $file && $file eq $spec->{file};
    die "no stdout/stderr descriptors\n" unless $args{stdout} && $args{stderr};
    POSIX::dup2(fileno $args{stdout}, 1) // die "dup2 stdout: $!\n";
    POSIX::dup2(fileno $args{stderr}, 2) // die "dup2 stderr: $!\n";
    close $args{stdout};
    close $args{stderr};
    $SPEC = $spec;
    ForkServer::Process::Exit::without_global_destruction(unless_own_most => 1) unless $spec->{destruct};
    no warnings 'exiting';
    last PROVE_TEST_CHILD;
}

=head2 parse_spec

  my $spec = parse_spec($text);    # a hash ref

=cut

sub parse_spec {
    my ($text) = @_;
    die "no spec on the config pipe\n" unless defined $text;
    my %spec = (arg => [], env => {}, inc => [], warnings => 0);
    for my $item (decode_array($text)) {
        my ($key, $value) = $item =~ /\A([a-z]+)=(.*)\z/s or die "bad spec item '$item'\n";
        if    ($key eq 'arg') { push @{ $spec{arg} }, $value }
        elsif ($key eq 'inc') { push @{ $spec{inc} }, $value }
        elsif ($key eq 'env') {
            my ($k, $v) = $value =~ /\A([^=]+)=(.*)\z/s or die "bad env item '$value'\n";
            $spec{env}{$k} = $v;
        }
        elsif ($key =~ /\A(?:file|cwd|warnings|destruct|merge|loads)\z/) { $spec{$key} = $value }
        else { die "unknown spec item '$key'\n" }
    }
    defined $spec{$_} or die "spec has no $_\n" for qw(file cwd);
    return \%spec;
}

# Everything `perl FILE` would have that a fork of the base has not.
sub _become {
    my (%spec) = @_;
    open STDIN, '<', '/dev/null' or die "STDIN from /dev/null: $!\n";
    %ENV = %{ $spec{env} };
    chdir $spec{cwd} or die "chdir '$spec{cwd}': $!\n";
    $0    = $spec{file};
    @ARGV = @{ $spec{arg} };
    @INC  = @{ $spec{inc} };
    $^T   = time;
    $^W   = $spec{warnings} ? 1 : 0;
    $@    = '';
    $?    = 0;
    $!    = 0;
    $SIG{$_} = 'DEFAULT' for grep { defined $SIG{$_} } keys %SIG;
    POSIX::dup2(1, 2) // die "dup2 stdout to stderr: $!\n" if $spec{merge};
    srand();    # else every test would draw the base's sequence
    FindBin::again() if defined &FindBin::again;
    Getopt::Long::ConfigDefaults() if defined &Getopt::Long::ConfigDefaults;
    _reopen_data_handles();
    _fresh_test2();
    ForkServer::Prove::Loads::report_at_exit($spec{loads}) if defined $spec{loads};
    return;
}

# A preloaded module's DATA handle shares its file offset with every fork:
# two tests reading it at once would read each other's lines. The handles
# are found once, in the base (looking through %INC takes milliseconds).
my @DATA_HANDLES;    # [package, file], open DATA handles of preloaded modules

sub _find_data_handles {
    @DATA_HANDLES = ();
    for my $file (keys %INC) {
        next unless $file =~ /\.pm\z/ && defined $INC{$file} && !ref $INC{$file};
        (my $pkg = $file) =~ s{/}{::}g;
        $pkg =~ s/\.pm\z//;
        my $fh = _data_handle($pkg) or next;
        push @DATA_HANDLES, [$pkg, $INC{$file}];
    }
    return;
}

# looked up in the stash, not by name: naming a glob would create it
sub _data_handle {
    my ($pkg) = @_;
    my $stash = do { no strict 'refs'; \%{"${pkg}::"} };
    my $glob = $stash->{DATA} or return;
    ref \$glob eq 'GLOB' or return;
    my $fh = *{$glob}{IO} or return;
    return defined fileno $fh ? $fh : undef;
}

sub _reopen_data_handles {
    for (@DATA_HANDLES) {
        my ($pkg, $file) = @$_;
        my $fh = _data_handle($pkg) or next;
        my $pos = tell $fh;
        next if $pos < 0;
        close $fh;
        open($fh, '<', $file) && seek($fh, $pos, SEEK_SET)
            or warn "emperor prove: cannot reopen ${pkg}::DATA ($file): $!\n";
    }
    return;
}

=head2 Exit without global destruction

A test leaves as L<ForkServer::Process::Exit> describes: its C<END> blocks (File::Temp's
clean-up among them) run, what it holds in globals of packages the base did
not have is freed (so their C<DESTROY> methods run as under perl), every
handle is flushed, and C<_exit> skips the global destruction of the inherited
heap, which costs a test about 30 ms with the benchmark's stack, more than
the test itself. What is skipped: C<DESTROY> of objects the test stored
inside preloaded modules' variables. A test that loaded more module files
than the base had leaves by perl's global destruction instead: freeing its
own packages one by one would then cost more (a DBIx-Class test over a base
of Test::More: 40 to 60 ms of CPU), and perl's is prove's. The spec item
C<destruct=1> (C<emperor prove --destruct>) always keeps perl's global
destruction.

=cut

# Test2 (and Test::Builder on it), if preloaded: the base loaded them in
# preload mode, which builds no hub; this makes the instance this process's,
# writing to its new STDOUT/STDERR. Test::Builder resets itself when Test2
# loads in this process (its post-load callback).
# The reset forgets the formatters that loaded modules registered
# (Test::Builder's Test::Builder::Formatter, whose todo_output tests use):
# they are registered again, most recent last, as loading them did.
sub _fresh_test2 {
    return unless $INC{'Test2/API.pm'};
    my @formatters = Test2::API::test2_formatters();
    Test2::API::test2_stop_preload();
    Test2::API::test2_post_preload_reset();
    Test2::API::test2_formatter_add($_) for reverse @formatters;
    return;
}

1;
