#!/usr/bin/perl
# Verifies a message's DKIM signatures with Perl Mail::DKIM, looking keys
# up at a given DNS server (the demo's BIND). Debian 12's Mail::DKIM
# predates Ed25519, so it reports those signatures as unsupported.
# usage: demo-verify.pl SERVER PORT MESSAGE
use strict;
use warnings;
use Mail::DKIM::Verifier;
use Mail::DKIM::DNS;
use Net::DNS::Resolver;

my ($server, $port, $path) = @ARGV;
Mail::DKIM::DNS::resolver(Net::DNS::Resolver->new(nameservers => [$server], port => $port));
open(my $fh, '<', $path) or die "$path: $!";
binmode $fh;
my $dkim = Mail::DKIM::Verifier->new();
while (my $line = <$fh>) {
    $line =~ s/\r?\n\z/\r\n/;
    $dkim->PRINT($line);
}
$dkim->CLOSE;
my $bad = 0;
foreach my $sig ($dkim->signatures) {
    my $result = $sig->result;
    printf "  Mail::DKIM: a=%s d=%s s=%s: %s%s\n", $sig->algorithm, $sig->domain, $sig->selector,
        $result, ($sig->result_detail ne $result ? " (" . ($sig->result_detail =~ s/^\Q$result\E \((.*)\)$/$1/r) . ")" : "");
    $bad++ if $result ne 'pass' && $sig->algorithm ne 'ed25519-sha256';
}
exit($bad ? 1 : 0);
