package ForkServer::Prove::JUnit;
use strict;
use warnings;

use Time::HiRes ();

=head1 NAME

ForkServer::Prove::JUnit - a JUnit XML report of a prove run (C<emperor prove --junit FILE>)

=head1 SYNOPSIS

  my $junit = ForkServer::Prove::JUnit->new;
  $junit->attach($harness);    # a TAP::Harness, before runtests
  ...
  $junit->write('junit.xml');

=head1 DESCRIPTION

One C<testsuite> per test file (C<time>: its seconds, which
C<--shard-times> reads back), one C<testcase> per test line, and a
C<testcase> "(file)" with an C<error> when the file failed other than by a
failing test (exit status, plan, parse errors).

=cut

sub new { return bless { files => [] }, shift }

sub attach {
    my ($self, $harness) = @_;
    $harness->callback(made_parser => sub {
        my ($parser, $job) = @_;
        my $rec = { name => $job->[0], started => Time::HiRes::time(), cases => [], tap => [] };
        push @{ $self->{files} }, $rec;
        $parser->callback(ALL => sub {
            my ($result) = @_;
            push @{ $rec->{tap} }, $result->as_string;
            return unless $result->is_test;
            push @{ $rec->{cases} }, {
                name    => join(' ', grep { length } $result->number, $result->description),
                failed  => !$result->is_ok,
                skipped => $result->has_skip ? ($result->explanation // '') : undef,
            };
        });
        $parser->callback(EOF => sub {
            my ($p) = @_;
            $rec->{time}   = Time::HiRes::time() - $rec->{started};
            $rec->{parser} = $p;
        });
    });
    return;
}

sub _x {
    my ($s) = @_;
    $s //= '';
    $s =~ s/&/&amp;/g; $s =~ s/</&lt;/g; $s =~ s/>/&gt;/g; $s =~ s/"/&quot;/g;
    $s =~ s/([\x00-\x08\x0B\x0C\x0E-\x1F])/sprintf '&#xFFFD;'/ge;
    return $s;
}

sub write {
    my ($self, $path) = @_;
    my $xml = qq{<?xml version="1.0" encoding="UTF-8"?>\n<testsuites>\n};
    for my $f (@{ $self->{files} }) {
        my $p = $f->{parser};
        my @cases = @{ $f->{cases} };
        my $failures = grep { $_->{failed} } @cases;
        my $skipped  = grep { defined $_->{skipped} } @cases;
        my @why;
        if ($p) {
            push @why, "exit status " . $p->exit if $p->exit;
            push @why, "wait status " . $p->wait if $p->wait && !$p->exit;
            push @why, $p->parse_errors;
        }
        else { push @why, 'no result' }
        my $errors = (@why && !$failures) ? 1 : 0;
        $xml .= sprintf qq{<testsuite name="%s" tests="%d" failures="%d" skipped="%d" errors="%d" time="%.3f">\n},
            _x($f->{name}), scalar @cases, $failures, $skipped, $errors, $f->{time} // 0;
        for my $c (@cases) {
            $xml .= sprintf qq{<testcase classname="%s" name="%s"}, _x($f->{name}), _x($c->{name});
            if ($c->{failed}) { $xml .= sprintf qq{><failure message="%s"/></testcase>\n}, _x($c->{name}) }
            elsif (defined $c->{skipped}) { $xml .= sprintf qq{><skipped message="%s"/></testcase>\n}, _x($c->{skipped}) }
            else { $xml .= "/>\n" }
        }
        if ($errors) {
            $xml .= sprintf qq{<testcase classname="%s" name="(file)"><error message="%s"/></testcase>\n},
                _x($f->{name}), _x(join '; ', @why);
        }
        $xml .= "<system-out>" . _x(join "\n", @{ $f->{tap} }) . "</system-out>\n</testsuite>\n";
    }
    $xml .= "</testsuites>\n";
    open my $fh, '>:raw', $path or die "emperor prove: --junit $path: $!\n";
    print $fh $xml;
    close $fh or die "emperor prove: --junit $path: $!\n";
    return;
}

1;
