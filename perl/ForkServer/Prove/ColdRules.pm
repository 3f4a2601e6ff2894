package ForkServer::Prove::ColdRules;
use strict;
use warnings;

=head1 NAME

ForkServer::Prove::ColdRules - whether a test file changes what a preloaded module was compiled with

=head1 SYNOPSIS

  my %cache;
  my $what = ForkServer::Prove::ColdRules::changes_before_preloaded_use($text, \%base_inc, \%cache);
  # 'CORE::GLOBAL', '%ENV', '$ENV{NAME}' or undef

=head1 DESCRIPTION

C<$text> is a test file's program text; C<\%base_inc> the C<%INC> of the
base it would be forked from (key => path); C<\%cache> remembers, per
variable name, whether a file of that base reads it at its top level (one
cache per base).

=cut

# %ENV or CORE::GLOBAL changed before a `use` of something the base loaded:
# the module was compiled (constants folded) before the change. For %ENV,
# only variables a preloaded file reads at its top level (an unindented
# line: `use constant X => $ENV{...}`, `our $X = $ENV{...}`); one read inside
# a sub is read when the test calls it, after its change (Mojo's
# MOJO_REACTOR). A change this misses makes the forked run fail, and the
# file is then run cold (the retry). Textual on purpose: cheap, and erring
# towards cold only costs time.
sub changes_before_preloaded_use {
    my ($text, $base_inc, $cache) = @_;
    my $last_use = -1;
    while ($text =~ /^\s*use\s+([A-Z][\w:]*)/mg) {
        my $at = $-[0];
        (my $inc = "$1.pm") =~ s{::}{/}g;
        $last_use = $at if $base_inc->{$inc};
    }
    return undef if $last_use < 0;
    # Only what runs at compile time can reach a `use` (which itself runs
    # at compile time, wherever it stands): the BEGIN blocks above it. An
    # assignment at run time above a `use` runs after it, under perl as
    # in a fork (Mojolicious's exception_lite_app.t sets MOJO_LOG_LEVEL so).
    my $before = '';
    while ($text =~ /\bBEGIN\s*(\{(?:[^{}]++|(?1))*+\})/g) {
        last if $-[0] >= $last_use;
        $before .= "$1\n";
    }
    $before =~ s/^\s*#.*$//mg;
    return 'CORE::GLOBAL' if $before =~ /CORE::GLOBAL::/;
    return '%ENV' if $before =~ /%ENV\s*=(?!=)/;
    my %names;
    $names{$1}++ while $before =~ /\$ENV\s*\{\s*['"]?(\w+)['"]?\s*\}\s*(?:\|\||\/\/|\.)?=(?!=)/g;
    $names{$1}++ while $before =~ /(?:local|delete)\s+\$ENV\s*\{\s*['"]?(\w+)['"]?\s*\}/g;
    for my $name (sort keys %names) {
        return "\$ENV{$name}" if _read_at_top_level($name, $base_inc, $cache);
    }
    return undef;
}

sub _read_at_top_level {
    my ($name, $base_inc, $cache) = @_;
    return $cache->{$name} //= do {
        my $found = 0;
        # the base's own code (ForkServer::Config reads PLACK_ENV as it
        # loads) is not the test's: only the preloads count
        (my $ours = $INC{'ForkServer/Prove/ColdRules.pm'} // '') =~ s{ForkServer/Prove/ColdRules\.pm\z}{ForkServer/};
        for my $path (grep { !/\A1\z/ && (!length $ours || index($_, $ours) != 0) } values %$base_inc) {
            open my $fh, '<', $path or next;
            local $/;
            my $src = <$fh> // '';
            $src =~ s/^__(?:END|DATA)__\b.*//ms;
            $src =~ s/^=[a-zA-Z].*?(?:^=cut\b[^\n]*|\z)//msg;    # POD
            # an unindented line, not inside a `sub {` on that line
            while ($src =~ /^(\S[^\n]*)\b\Q$name\E\b/mg) {
                next if $1 =~ /\bsub\b(?:\s+\w+)?\s*\{/ || $1 =~ /^\s*#/;
                $found = 1;
                last;
            }
            last if $found;
        }
        $found;
    };
}

1;
