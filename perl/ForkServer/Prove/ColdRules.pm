package ForkServer::Prove::ColdRules;
use strict;
use warnings;

=head1 NAME

ForkServer::Prove::ColdRules - whether a test file changes what a preloaded module was compiled with

=head1 SYNOPSIS

  my %cache;
  my $what = ForkServer::Prove::ColdRules::changes_before_preloaded_use($text, \%base_inc, \%cache, \@dirs);
  # 'CORE::GLOBAL', '%ENV', '$ENV{NAME}', '%INC' or undef
  my $text_and_done = ForkServer::Prove::ColdRules::with_done_files($text);
  my $code = ForkServer::Prove::ColdRules::compile_time_code($source);

=head1 DESCRIPTION

C<$text> is a test file's program text; C<\%base_inc> the C<%INC> of the
base it would be forked from (key => path); C<\%cache> remembers, per
variable name, whether a file of that base reads it as it compiles, and the
helper modules' code (one cache per base); C<\@dirs> the directories where
the file's helper modules are looked for (its C<use lib> ones, C<@INC>).

=cut

# %ENV, CORE::GLOBAL or %INC changed before a `use` of something the base
# loaded: the module was compiled (constants folded, optional modules looked
# for) before the change. For %ENV, only variables a preloaded file reads as
# it compiles (outside its subs: `use constant X => $ENV{...}`, a block of
# its top level as JSON.pm reads PERL_JSON_BACKEND); one read inside a sub
# is read when the test calls it, after its change (Mojo's MOJO_REACTOR). A
# change this misses makes the forked run fail, and the file is then run
# cold (the retry). Textual on purpose: cheap, and erring towards cold only
# costs time.
sub changes_before_preloaded_use {
    my ($text, $base_inc, $cache, $dirs) = @_;
    my $last_use = -1;
    my @helpers;    # [position, %INC key] of modules the base has not loaded
    # (`BEGIN { use_ok('JSON') }` loads it at compile time as `use` does)
    while ($text =~ /^\s*use\s+([A-Z][\w:]*)|\buse_ok\s*\(?\s*['"]([A-Z][\w:]*)/mg) {
        my $at = $-[0];
        (my $inc = "$+.pm") =~ s{::}{/}g;
        if ($base_inc->{$inc}) { $last_use = $at; next }
        push @helpers, [$at, $inc];
        # a helper of the suite's that itself uses a preloaded module loads
        # it here (Params-Validate's t/lib/PVTests/Standard.pm)
        $last_use = $at if grep { $base_inc->{$_} } _helper_uses($inc, $dirs // [], $cache);
    }
    return undef if $last_use < 0;
    # Only what runs at compile time can reach a `use` (which itself runs
    # at compile time, wherever it stands): the BEGIN blocks above it, and
    # what a module it uses above it does as that loads (a suite's helper
    # overriding CORE::GLOBAL, as File-Slurp's tests' FileSlurpTestOverride).
    # An assignment at run time above a `use` runs after it, under perl as
    # in a fork (Mojolicious's exception_lite_app.t sets MOJO_LOG_LEVEL so).
    my $before = '';
    while ($text =~ /\bBEGIN\s*(\{(?:[^{}]++|(?1))*+\})/g) {
        last if $-[0] >= $last_use;
        $before .= "$1\n";
    }
    # A file run by `require 'PATH'` / `do 'PATH'` (its text follows, from
    # with_done_files) compiles when that statement runs: what the test did
    # at run time above it ran before that file's `use`s (DBI's generated
    # t/zvp_*.t set DBI_PUREPERL, then require the real t/NNname.t).
    my $run_before;
    pos($text) = undef;    # (the BEGIN loop above may have stopped midway)
    while ($text =~ /\b(?:do|require)\s*\(?\s*(['"])([^'"\$\@\s]+\.(?:t|pl|pm))\1/g) {
        last if $-[0] >= $last_use;
        $run_before = $-[0] if -f $2;
    }
    $before .= substr($text, 0, $run_before) . "\n" if defined $run_before;
    $before =~ s/^\s*#.*$//mg;
    for my $helper (grep { $_->[0] < $last_use } @helpers) {
        $before .= _helper_code($helper->[1], $dirs // [], $cache) . "\n";
    }
    return 'CORE::GLOBAL' if $before =~ /CORE::GLOBAL::/;
    return '%ENV' if $before =~ /%ENV\s*=(?!=)/;
    # a module pretended loaded or forgotten (Sub-Quote's tests), an @INC hook
    return '%INC' if $before =~ /\$INC\s*\{[^}]*\}\s*(?:\|\||\/\/)?=(?!=)|delete\s+\$INC\s*\{/
        || $before =~ /(?:unshift|push)\s*\(?\s*\@INC\s*,\s*(?:sub\b|\\&|bless\b)/;
    my %names;
    $names{$1}++ while $before =~ /\$ENV\s*\{\s*['"]?(\w+)['"]?\s*\}\s*(?:\|\||\/\/|\.)?=(?!=)/g;
    $names{$1}++ while $before =~ /(?:local|delete)\s+\$ENV\s*\{\s*['"]?(\w+)['"]?\s*\}/g;
    for my $name (sort keys %names) {
        return "\$ENV{$name}" if _read_at_compile_time($name, $base_inc, $cache);
    }
    return undef;
}

=head2 with_done_files

The file's text followed by that of each file it runs by C<do 'PATH'> or
C<require 'PATH'> (a literal path, one level): a test that is another file
run with an option (Sub-Quote's F<t/quotify-no-hex.t>) is judged by both.

=cut

sub with_done_files {
    my ($text) = @_;
    my $all = $text;
    while ($text =~ /\b(?:do|require)\s*\(?\s*(['"])([^'"\$\@\s]+\.(?:t|pl|pm))\1/g) {
        my $path = $2;
        next unless -f $path && open my $fh, '<', $path;
        local $/;
        my $done = <$fh> // '';
        $done =~ s/^__(?:END|DATA)__\b.*//ms;
        $all .= "\n$done";
    }
    return $all;
}

=head2 compile_time_code

A module's source without what does not run as it compiles: POD, comments,
C<__END__>/C<__DATA__> and the bodies of its subs (named or anonymous).

=cut

sub compile_time_code {
    my ($src) = @_;
    $src =~ s/^__(?:END|DATA)__\b.*//ms;
    $src =~ s/^=[a-zA-Z].*?(?:^=cut\b[^\n]*|\z)//msg;    # POD
    $src =~ s/^\s*#.*$//mg;
    # (a brace in a string or regex that leaves a body unbalanced keeps that
    # body: more is then taken as compile-time code, which errs towards cold)
    $src =~ s/\bsub\b(?:\s+[\w:']+)?\s*(?:\([^)]*\)\s*)?(?::\s*\w+(?:\([^)]*\))?\s*)*(\{(?:[^{}]++|(?1))*+\})/sub {}/g;
    return $src;
}

=head2 acts_on_every_test

  my $why = acts_on_every_test($module, @dirs);    # or undef

Whether a module, found in C<@dirs>, acts on the whole process as it loads
(a C<$SIG{__WARN__}> or C<$SIG{__DIE__}> handler installed outside its subs,
as Test::Warnings and Test::NoWarnings do, with an C<END> block that adds a
test): a base that preloaded it would give every forked test the C<END>
block, also the files that do not use it, and its handler to none (a fork's
%SIG is perl's). The automatic preload leaves such a module out.

=cut

sub acts_on_every_test {
    my ($module, @dirs) = @_;
    (my $inc = "$module.pm") =~ s{::}{/}g;
    for my $dir (grep { defined && !ref } @dirs) {
        open my $fh, '<', "$dir/$inc" or next;
        local $/;
        my $src = <$fh> // '';
        return undef if index($src, '__WARN__') < 0 && index($src, '__DIE__') < 0;
        return compile_time_code($src) =~ /(?<!local )\$SIG\s*\{\s*['"]?(__(?:WARN|DIE)__)['"]?\s*\}\s*=(?!=)/
            ? "it installs \$SIG{$1} as it loads" : undef;
    }
    return undef;
}

=head2 helper_dirs

Where the file's helper modules are looked for: its C<use lib 'DIR'>
directories, F<t/lib> and F<lib> beside it (File-Slurp's
C<use lib File::Spec-E<gt>catdir(dirname(__FILE__), 'lib')>), then C<@INC>.

=cut

sub helper_dirs {
    my ($file, $text) = @_;
    (my $dir = $file) =~ s{/?[^/]*\z}{};
    my @dirs;
    push @dirs, $+ while $text =~ /^\s*use\s+lib\s+(?:(['"])([^'"]+)\1|qw\s*[(\[{]\s*([^\s)\]}]+))/mg;
    return (@dirs, 't/lib', (length $dir ? "$dir/lib" : 'lib'), @INC);
}

sub _helper_code {
    my ($inc, $dirs, $cache) = @_;
    return $cache->{"\0helper\0$inc"} //= do {
        my $code = '';
        for my $dir (grep { defined && !ref } @$dirs) {
            open my $fh, '<', "$dir/$inc" or next;
            local $/;
            my $src = <$fh> // '';
            # (most name none of what the rules look for: not worth stripping)
            $code = compile_time_code($src) if $src =~ /CORE::GLOBAL::|ENV|INC/;
            last;
        }
        $code;
    };
}

# The %INC keys of the modules a helper module `use`s (its own `use` lines).
sub _helper_uses {
    my ($inc, $dirs, $cache) = @_;
    my $uses = $cache->{"\0uses\0$inc"} //= do {
        my @keys;
        for my $dir (grep { defined && !ref } @$dirs) {
            open my $fh, '<', "$dir/$inc" or next;
            local $/;
            my $src = <$fh> // '';
            $src =~ s/^__(?:END|DATA)__\b.*//ms;
            while ($src =~ /^\s*use\s+([A-Z][\w:]*)/mg) {
                (my $key = "$1.pm") =~ s{::}{/}g;
                push @keys, $key;
            }
            last;
        }
        \@keys;
    };
    return @$uses;
}

sub _read_at_compile_time {
    my ($name, $base_inc, $cache) = @_;
    return $cache->{$name} //= do {
        my $found = 0;
        # the base's own code (ForkServer::Config reads PLACK_ENV as it
        # loads) is not the test's: only the preloads count
        (my $ours = $INC{'ForkServer/Prove/ColdRules.pm'} // '') =~ s{ForkServer/Prove/ColdRules\.pm\z}{ForkServer/};
        for my $path (grep { !/\A1\z/ && (!length $ours || index($_, $ours) != 0) } values %$base_inc) {
            # stripped (~1 ms per 10 KB) only when it names the variable
            my $src = $cache->{"\0src\0$path"} //= _source($path);
            next if index($src, $name) < 0;
            my $code = $cache->{"\0code\0$path"} //= compile_time_code($src);
            if ($code =~ /\b\Q$name\E\b/) {
                $found = 1;
                last;
            }
        }
        $found;
    };
}

sub _source {
    my ($path) = @_;
    open my $fh, '<', $path or return '';
    local $/;
    return <$fh> // '';
}

1;
